"""Issue 13's end-to-end cases under DeepSpeed's launcher (ZeRO-3 on CPU, 2 processes): a damaged newest
checkpoint and a garbage ``latest`` on --resume, a run that goes non-finite, and SIGTERM to the launcher
wrapper. Checkpoints present before each failure stay there, loadable."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from avfmae.launch import local_ranks
from avfmae.training import CheckpointManager, ExitCode
from tests.helpers.ports import free_port

from .test_training_deepspeed import (  # noqa: F401 (fixture)
    DEEPSPEED,
    LAUNCH_ENV,
    ROOT,
    config,
    dataset,
    events,
    run_launcher,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEEPSPEED.exists(), reason="needs the `train` extra (deepspeed launcher)"),
]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_skips_a_damaged_checkpoint_and_a_diverging_run_stops_without_saving(dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    first = run_launcher(config(dataset, out, stop_at_step=2, checkpoint_every_steps=1, keep_checkpoints=5))
    assert first.returncode == ExitCode.STOPPED_AT_STEP == 4, first.stdout[-3000:] + first.stderr[-3000:]
    assert CheckpointManager(ckpt).tags() == ["step_00000002", "step_00000001"]
    (ckpt / "step_00000002" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()  # one rank's shard lost
    (ckpt / "latest").write_bytes(b"\xff\xfe garbage \x00")
    damaged, kept = snapshot(ckpt / "step_00000002"), {"step_00000001": snapshot(ckpt / "step_00000001")}

    # resumed with an lr that makes the loss non-finite: stops at the first bad step, exit 3, saves nothing
    second = run_launcher(config(dataset, out, lr=1e30, max_nonfinite_steps=1), "--resume")
    output = second.stdout + second.stderr
    assert second.returncode == ExitCode.RUN_ERROR == 3, output[-3000:]
    assert "step_00000001 is the newest checkpoint complete on every rank" in output
    assert "skipped step_00000002: file zero_pp_rank_1_mp_rank_00_model_states.pt is missing" in output
    assert "non-finite loss for 1 step(s) in a row" in output and "loss_video=nan" in output
    assert events(out, "resume")[0]["tag"] == "step_00000001"
    bad = events(out, "nonfinite")
    assert len(bad) == 1 and bad[0]["step"] > 1
    assert not (out / "model_fp32.pt").exists()
    assert not {e["step"] for e in events(out, "checkpoint")} & {bad[0]["step"]}
    aside = list(ckpt.glob("step_00000002.incomplete-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == damaged  # renamed, never deleted or overwritten
    manager = CheckpointManager(ckpt)
    for tag, files in kept.items():
        assert snapshot(ckpt / tag) == files and manager.problem(tag, world=2) is None
        torch.load(ckpt / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)


def test_sigterm_to_the_launcher_wrapper_reaches_every_rank(dataset, tmp_path):  # noqa: F811
    out = tmp_path / "terminated"
    cfg = config(dataset, out, epochs=50)
    cmd = [sys.executable, "-m", "avfmae.launch", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "train.py"), "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: (out / "log.jsonl").exists() and events(out, "train"), proc, 240, "first train record")
    (runner,) = psutil.Process(proc.pid).children()
    ranks = local_ranks(runner.pid)
    assert len(ranks) == 2 and all("train.py" in " ".join(p.cmdline()) for p in ranks)
    proc.send_signal(signal.SIGTERM)  # the one process a scheduler knows: not the process group
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == ExitCode.STOPPED_BY_SIGNAL == 5, output[-3000:]
    saved = events(out, "checkpoint")
    assert saved and saved[-1]["reason"] == "signal SIGTERM", output[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == saved[-1]["tag"]
    assert CheckpointManager(out / "checkpoints").problem(saved[-1]["tag"], world=2) is None
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "checkpoint"
