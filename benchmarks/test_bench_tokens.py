"""gather_tokens / assemble_decoder_tokens / masked_mse_loss vs the way MAE/VideoMAE code does it.

The "mae_way" baselines are written as in MAE-family repositories: boolean-mask indexing of the
tokens plus a separate positional add, torch.cat of encoder tokens and expanded mask tokens, and a
loss that materialises gathered and normalised targets. Group names pair each op with its baseline;
the ratio of their medians is the speedup. On CUDA the mae_kernels cases run Triton; on CPU both
sides run torch (the reference), so CPU ratios only check the harness.
"""

import mae_kernels
import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE, run_timed

pytestmark = pytest.mark.kernels

# video pre-training shapes (DESIGN): N=800 tokens, 80 visible, 400 decoder-visible; audio N=128
BATCH = 32 if CUDA else 4
VIDEO = dict(N=800, ME=80, MD=400)
AUDIO = dict(N=128, ME=24, MD=64)
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROLES = {"mae_kernels": "ours", "mae_way": "baseline"}  # benchmarks/report.py: ratio = mae_way / mae_kernels


def masks(B, N, M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)])
    return idx.to(DEVICE), mae_kernels.indices_to_mask(idx, N).to(DEVICE)


def tensors(B, N, C, requires_grad=False):
    x = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    pos = torch.randn(N, C, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    return x, pos


def mae_way_gather(x, keep, pos):
    B, _, C = x.shape
    return x[keep].reshape(B, -1, C) + pos.expand(B, -1, -1)[keep].reshape(B, -1, C)


def mae_way_assemble(enc, mask_token, pos, enc_keep, dec_keep):
    B, _, C = enc.shape
    pos_b = pos.expand(B, -1, -1)
    pos_vis = pos_b[enc_keep].reshape(B, -1, C)
    pos_dec = pos_b[dec_keep].reshape(B, -1, C)
    return torch.cat([enc + pos_vis, mask_token.expand(B, pos_dec.shape[1], -1) + pos_dec], dim=1)


def mae_way_loss(pred, patches, dec_keep, groups):
    B, _, P = pred.shape
    target = patches[dec_keep].reshape(B, -1, groups, P // groups)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, unbiased=False, keepdim=True)
    target = ((target - mean) / (var + 1e-6) ** 0.5).reshape(B, -1, P)
    return ((pred.float() - target.float()) ** 2).mean()


def check_agree(cases, grad_of=None):
    """Before timing: both sides' outputs (and ``grad_of``'s gradient, for a fwd+bwd case) agree."""
    results = {}
    for impl, fn in cases.items():
        if grad_of is not None:
            grad_of.grad = None
        out = fn().detach().float()
        results[impl] = (out, None if grad_of is None else grad_of.grad.float())
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-5  # the baseline normalises targets in DTYPE
    (out, grad), (want, want_grad) = results["mae_kernels"], results["mae_way"]
    pairs = [("output", out, want)] + ([("gradient", grad, want_grad)] if grad_of is not None else [])
    for what, got, ref in pairs:  # atol on the tensor's scale: a loss gradient is ~1 / numel
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                   msg=lambda m, w=what: f"{w}: {m}")
    if grad_of is not None:
        grad_of.grad = None


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("modality,C", [("video", 512), ("video", 768), ("audio", 512)])
@pytest.mark.parametrize("impl", ["mae_kernels", "mae_way"])
def test_gather_tokens(benchmark, modality, C, impl):
    shape = VIDEO if modality == "video" else AUDIO
    benchmark.group = f"gather_tokens {modality} C={C}"
    benchmark.extra_info["role"] = ROLES[impl]
    x, pos = tensors(BATCH, shape["N"], C)
    idx, keep = masks(BATCH, shape["N"], shape["ME"])
    cases = {"mae_kernels": lambda: mae_kernels.gather_tokens(x, idx, pos),
             "mae_way": lambda: mae_way_gather(x, keep, pos)}
    check_agree(cases)
    fn = cases[impl]
    out = fn()
    run_timed(benchmark, fn, bytes_moved=2 * nbytes(out) + nbytes(idx))


@pytest.mark.parametrize("modality,C", [("video", 384), ("video", 512), ("audio", 384)])
@pytest.mark.parametrize("impl", ["mae_kernels", "mae_way"])
def test_assemble_decoder_tokens(benchmark, modality, C, impl):
    shape = VIDEO if modality == "video" else AUDIO
    benchmark.group = f"assemble_decoder_tokens {modality} C={C}"
    benchmark.extra_info["role"] = ROLES[impl]
    enc = torch.randn(BATCH, shape["ME"], C, device=DEVICE, dtype=DTYPE)
    token = torch.randn(C, device=DEVICE, dtype=DTYPE)
    _, pos = tensors(1, shape["N"], C)
    enc_idx, enc_keep = masks(BATCH, shape["N"], shape["ME"], seed=1)
    dec_idx, dec_keep = masks(BATCH, shape["N"], shape["MD"], seed=2)
    cases = {"mae_kernels": lambda: mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx),
             "mae_way": lambda: mae_way_assemble(enc, token, pos, enc_keep, dec_keep)}
    check_agree(cases)
    fn = cases[impl]
    out = fn()
    run_timed(benchmark, fn, bytes_moved=2 * nbytes(out))


@pytest.mark.parametrize("modality,P,groups", [("video", 1536, 3), ("audio", 256, 1)])
@pytest.mark.parametrize("impl", ["mae_kernels", "mae_way"])
def test_masked_mse_loss_fwd_bwd(benchmark, modality, P, groups, impl):
    shape = VIDEO if modality == "video" else AUDIO
    benchmark.group = f"masked_mse_loss fwd+bwd {modality} P={P}"
    benchmark.extra_info["role"] = ROLES[impl]
    pred = torch.randn(BATCH, shape["MD"], P, device=DEVICE, dtype=DTYPE, requires_grad=True)
    patches = torch.randn(BATCH, shape["N"], P, device=DEVICE, dtype=DTYPE)
    dec_idx, dec_keep = masks(BATCH, shape["N"], shape["MD"], seed=3)

    def step(loss_of):
        def fn():
            loss = loss_of()
            loss.backward()
            return loss
        return fn

    cases = {"mae_kernels": step(lambda: mae_kernels.masked_mse_loss(pred, patches, dec_idx, norm_pix=True,
                                                                     norm_groups=groups)),
             "mae_way": step(lambda: mae_way_loss(pred, patches, dec_keep, groups))}
    check_agree(cases, grad_of=pred)
    fn = cases[impl]

    # forward reads pred + gathered patches; backward reads both again and writes grad
    run_timed(benchmark, fn, bytes_moved=5 * nbytes(pred))
