"""avfmae.op_count.count_launch_kinds: kernels a step launches, and the matmuls among them (the part
fusion cannot remove), eager and under inductor."""

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config

from avfmae.op_count import count_launch_kinds

# forward: two addmm; backward: dX and dW of the second layer, dW only of the first (x needs no grad)
MLP_MATMULS = 2 + 3


def _mlp_step():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    return mlp, x


def test_eager_launches_count_every_kernel_and_the_matmuls_apart():
    mlp, x = _mlp_step()
    counts = count_launch_kinds(lambda: mlp(x).square().sum().backward())
    assert counts.matmuls == MLP_MATMULS
    # gelu, square, sum forward; their backward, bias-gradient sums, the ones seeding backward
    assert counts.total - counts.matmuls >= 6


@pytest.mark.slow
def test_compiled_launches_fuse_the_elementwise_work_but_not_the_matmuls(monkeypatch):
    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", True)
    mlp, x = _mlp_step()
    eager = count_launch_kinds(lambda: mlp(x).square().sum().backward())
    compiled = torch.compile(mlp, fullgraph=True)
    compiled(x).square().sum().backward()  # compile outside the count
    mlp.zero_grad(set_to_none=True)
    counts = count_launch_kinds(lambda: compiled(x).square().sum().backward())
    assert counts.matmuls == MLP_MATMULS
    assert 0 < counts.total - counts.matmuls < eager.total - eager.matmuls
