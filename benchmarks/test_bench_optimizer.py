"""The AdamW update of a pre-training step, per torch implementation, side by side.

train.py and every step case use torch's fused AdamW on CPU and CUDA alike (it used to be fused on
CUDA only); this group is the measurement behind that choice. The parameters are AVF-MAE++'s at the
size timed (188M at base), with fixed random gradients; one case times ``optimizer.step()`` alone.
Roles: the for-loop update (torch's CPU default before) is the baseline, foreach a peer.
"""

import pytest
import torch

import avfmae
from benchmarks.conftest import DEVICE, run_timed
from benchmarks.test_bench_step import ADAMW_IMPLEMENTATIONS, _optimizer, _sizes

pytestmark = pytest.mark.step

ROLES = {"fused": "ours", "foreach": "peer", "for-loop": "baseline"}


@pytest.mark.parametrize("size", _sizes())
@pytest.mark.parametrize("implementation", sorted(ADAMW_IMPLEMENTATIONS))
def test_adamw_update(benchmark, size, implementation):
    benchmark.group = f"AdamW update {size}"
    benchmark.extra_info["role"] = ROLES[implementation]
    torch.manual_seed(0)
    model = avfmae.build_model(size, "pretrain").to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = _optimizer(model, implementation)
    benchmark.extra_info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    run_timed(benchmark, optimizer.step, rounds=8)
