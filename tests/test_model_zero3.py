"""The models under DeepSpeed ZeRO-3 with every parameter partitioned train exactly like plain PyTorch.

A parameter read outside its owning module's forward (or a gradient landing on a released partition)
would make the ZeRO-3 run fail or diverge from the plain run. Runs tests/helpers/zero3_step.py in a
subprocess (one process, gloo), so this test process never initialises torch.distributed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.ports import free_port

deepspeed = pytest.importorskip("deepspeed", reason="needs the `train` extra")
SCRIPT = Path(__file__).with_name("helpers") / "zero3_step.py"


@pytest.mark.slow
def test_zero3_matches_plain_training_for_every_model():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MAE_KERNELS_BACKEND": "torch"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(free_port())], capture_output=True, text=True, env=env,
                            timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("RESULT "))
    assert set(report) == {"pretrain", "pretrain_checkpointed", "hicmae_pretrain", "finetune",
                           "finetune_checkpointed"}
    for case, runs in report.items():
        plain_groups, zero_groups = runs["groups"]
        assert zero_groups == plain_groups, case  # weight decay / layer decay see the full shapes
        assert {g[1] for g in plain_groups} == {0.0, 0.05}, case
        assert runs["zero3"] == pytest.approx(runs["plain"], rel=1e-3), case
        ratio, name = runs["worst_update_error"]
        assert ratio < 0.1, f"{case}: {name} moved differently under ZeRO-3 ({ratio:.3f} of its update)"
        assert runs["plain"][-1] < runs["plain"][0], case  # the steps really trained
