"""The drop-in benchmark (benchmarks/test_bench_dropin.py) compares like with like: its VideoMAE-way model
and its mae_kernels drop-in, with the same parameters, inputs and mask, compute the same loss and the same
gradients. Here, not in benchmarks/: `make bench` runs only the timed cases (--benchmark-only)."""

import pytest
import torch

from benchmarks.test_bench_dropin import VideoMAEBase

# the benchmark's harness at a few hundred thousand parameters (two encoder blocks, one decoder block)
SMALL = dict(batch=2, frames=4, size=64, patch=16, dim=64, depth=2, heads=2, dec_dim=32, dec_depth=1, dec_heads=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_both_sides_of_the_dropin_benchmark_compute_the_same_loss_and_gradients(device, seed):
    torch.manual_seed(seed)
    videomae_way = VideoMAEBase(kernels=False, s=SMALL).to(device)
    dropin = VideoMAEBase(kernels=True, s=SMALL).to(device)
    dropin.load_state_dict(videomae_way.state_dict())
    s = SMALL
    videos = torch.randn(s["batch"], 3, s["frames"], s["size"], s["size"], device=device)
    scores = torch.rand(s["batch"], videomae_way.N, device=device)
    mask = scores.argsort(dim=1).argsort(dim=1) < videomae_way.num_masked  # a fixed count per row, as the benchmark
    want, got = videomae_way(videos, mask), dropin(videos, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.backward()
    got.backward()
    grads = {name: p.grad for name, p in videomae_way.named_parameters()}
    for name, p in dropin.named_parameters():
        assert p.grad is not None and grads[name] is not None, name
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
