"""Every mae_kernels Triton kernel compiles to a CUDA cubin for sm_80 and sm_90, without a GPU.

The interpreter tests check the kernels' values but never lower them, so GPU-only codegen errors
(tl.dot shape/dtype rules, 16-bit casts, layouts, ptxas) would first show up on a GPU. The helper
tests/helpers/compile_kernels.py records the launches the ops make at the LGI-Former stage shapes
(forward and backward, bf16/fp16/fp32) and compiles each distinct specialisation; it runs in a
subprocess because this process has TRITON_INTERPRET=1, which makes @triton.jit functions
uncompilable. Its docstring says which autotune configs are covered (MAX_CONFIGS here). The same
compiles give each launch's registers, spills and shared memory: none may spill or exceed the
device's shared memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.helpers.compile_kernels import select_configs

SCRIPT = Path(__file__).with_name("helpers") / "compile_kernels.py"
MAX_CONFIGS = 1  # autotune configs per launch site (the smallest tile) + the interpreter tiling; 0 = all
TARGETS = ("sm_80", "sm_90")


@pytest.mark.slow
def test_every_kernel_compiles_to_cubin_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # cold cache: every signature really compiles
    cmd = [sys.executable, str(SCRIPT), "--max-configs", str(MAX_CONFIGS), "--targets", ",".join(TARGETS),
           "--workers", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(lines[-1].removeprefix("RESULT "))

    assert not report["failures"], json.dumps(report["failures"], indent=1)[:20000]
    assert report["entry_points"], "no @triton.jit kernels found in mae_kernels"
    assert report["recorded"] == report["entry_points"], "kernels the ops never launched at these shapes"
    for name, kernel in report["kernels"].items():
        assert kernel["launches"] >= kernel["signatures"] >= 1, name
        for target in TARGETS:
            assert kernel[target] == kernel[f"signatures_{target}"] >= 1, \
                f"{name}: not every signature recorded for {target} compiled"
        assert kernel["min_cubin_bytes"] > 0, name

    # resources of the same cubins (ptxas -v, Triton's metadata): every launch fits the device and never
    # spills; the autotuned ones were pruned as on that architecture (tests/test_kernel_resources.py)
    assert len(report["resources"]) == report["compiles"]
    spilling = [r for r in report["resources"] if r["spills"]]
    assert not spilling, json.dumps(spilling, indent=1)[:20000]
    too_big = [r for r in report["resources"] if not r["launchable"]]
    assert not too_big, json.dumps(too_big, indent=1)[:20000]


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in tiles]


def test_select_configs_spreads_over_pruned_list_and_keeps_interpreter_tiling():
    pruned = _configs([(m, m, w) for m in (16, 32, 64, 128) for w in (2, 4, 8)])
    assert select_configs(pruned, 0, None) == pruned
    assert select_configs(pruned[:3], 4, (64, 64)) == pruned[:3]
    two = select_configs(pruned, 2, None)
    assert two == [pruned[0], pruned[-1]]  # smallest and largest tile
    four = select_configs(pruned, 4, None)
    assert len(set(four)) == 4 and four[0] is pruned[0] and four[-1] is pruned[-1]
    with_interp = select_configs(pruned, 2, (32, 32))
    assert with_interp[:2] == two and with_interp[2].kwargs == {"BLOCK_M": 32, "BLOCK_N": 32}
    assert with_interp[2].num_warps == 4  # the interpreter launch's default, not the first listed
    assert select_configs(pruned, 2, (128, 128)) == two  # already covered: nothing added
    assert select_configs(pruned, 2, (256, 256)) == two  # pruned away: the GPU never runs it
