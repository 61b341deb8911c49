"""benchmarks/run_gpu.sh's plumbing on a CPU: every stage runs (the CUDA-only ones at tiny size on the
CPU, with the syncs counted at the dispatcher instead of by CUDA; the kernel benchmarks on a sample),
records its outcome, and a report of each benchmark run comes out. On a GPU machine the same script
runs the real thing."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.subprocess_env import own_session_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_run_gpu_script_runs_every_stage_on_cpu(tmp_path):
    env = own_session_env(RUN_GPU_ON_CPU="1", OUT_DIR=str(tmp_path), HICMAE_PATH="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    for stage in ("tests", "sync", "step", "kernels", "report"):
        assert f"stage {stage}: ok" in summary
    syncs = json.loads((tmp_path / "sync-check.json").read_text())
    assert {r["task"] for r in syncs} == {"pretrain", "pretrain-table4", "hicmae-baseline", "finetune"}
    assert all(r["model_step"] == "ok" and r["device"] == "cpu" for r in syncs)
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1 and "tiny-avfmae" in reports[0].read_text()
    assert "aten ops" in reports[0].read_text()
    kernel_reports = list((tmp_path / "kernels").glob("*.md"))  # the same name: a folder of its own
    assert [r.name for r in kernel_reports] == [reports[0].name]
    kernels = kernel_reports[0].read_text()
    assert "grouped_attention" in kernels and "gather_tokens" in kernels and "tiny-avfmae" not in kernels
