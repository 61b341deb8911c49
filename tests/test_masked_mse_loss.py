"""masked_mse_loss: Triton (interpreter on CPU) against the torch reference, and against MAE's formula."""

import mae_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mae_kernels.masked_mse_loss import masked_mse_loss_reference

from tests.conftest import DEVICE, INTERPRETED

BACKENDS = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def case(B, N, M, P, dtype=torch.float32, valid_frac=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, M, P, generator=gen).to(DEVICE, dtype).requires_grad_()
    patches = (torch.rand(B, N, P, generator=gen) * 3 + 1).to(DEVICE, dtype)
    idx = torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(B)]).to(DEVICE)
    valid = None if valid_frac is None else (torch.rand(B, M, generator=gen) < valid_frac).to(DEVICE)
    return pred, patches, idx, valid


def check_against_reference(pred, patches, idx, valid, **kw):
    dtype = pred.dtype
    with mae_kernels.backend("triton"):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, **kw)
    ref = masked_mse_loss_reference(pred, patches, idx, valid, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=TOL[dtype], rtol=TOL[dtype])
    (g,) = torch.autograd.grad(loss, pred)
    (want,) = torch.autograd.grad(ref, pred)
    assert g.dtype == dtype and g.shape == pred.shape
    scale = want.float().abs().max().item() + 1e-12
    torch.testing.assert_close(g.float(), want.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,M,P,groups", [(2, 800, 80, 1536, 3), (3, 128, 64, 256, 1), (1, 10, 1, 40, 1),
                                            (2, 50, 17, 200, 2)])
@pytest.mark.parametrize("valid_frac", [None, 0.5])
def test_matches_reference(dtype, B, N, M, P, groups, valid_frac):
    check_against_reference(*case(B, N, M, P, dtype, valid_frac), norm_groups=groups, norm_pix=True)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_mae_formula(norm_pix):
    """The loss MAE computes: normalise target per patch (eps in the sqrt), mean over P, mean over rows."""
    pred, patches, idx, valid = case(2, 30, 12, 48, valid_frac=0.6, seed=3)
    target = torch.stack([patches[b, idx[b]] for b in range(2)])
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_row = ((pred - target) ** 2).mean(dim=-1)
    expected = (per_row * valid).sum() / valid.sum()
    with mae_kernels.backend("triton"):
        got = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=norm_pix)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_no_valid_rows_gives_zero_not_nan():
    pred, patches, idx, _ = case(2, 20, 5, 16)
    valid = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    with mae_kernels.backend("triton"):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=True)
    (g,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0


def test_invalid_rows_get_no_gradient():
    pred, patches, idx, valid = case(2, 40, 20, 32, valid_frac=0.5, seed=1)
    with mae_kernels.backend("triton"):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=True)
    (g,) = torch.autograd.grad(loss, pred)
    assert torch.count_nonzero(g[~valid]) == 0 and torch.count_nonzero(g[valid]) > 0


def loss_over_valid_rows_float64(pred, patches, idx, valid, norm_pix):
    """The MAE formula in float64 over the valid rows alone (boolean indexing: invalid rows never enter)."""
    target = torch.stack([patches[b, idx[b]] for b in range(pred.shape[0])]).double()[valid]
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    return ((pred.double()[valid] - target) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_nan_and_inf_in_invalid_rows_do_not_count(backend, norm_pix):
    """Invalid rows do not count on either backend, whatever they hold: loss and gradient equal the
    float64 formula over the valid rows, the invalid rows' gradient is exactly 0; a NaN in a valid row
    still makes the loss NaN."""
    pred, patches, idx, _ = case(2, 12, 5, 16, seed=5)
    valid = torch.tensor([[True, False, True, True, False], [True, True, False, True, True]], device=DEVICE)
    pred, patches = pred.detach().clone(), patches.clone()
    pred[0, 1, 3], pred[1, 2, 0] = float("nan"), float("inf")
    patches[0, idx[0, 4], 5], patches[1, idx[1, 2], 7] = float("nan"), -float("inf")  # idx rows never repeat
    pred.requires_grad_()
    exact = pred.detach().double().requires_grad_()
    want = loss_over_valid_rows_float64(exact, patches, idx, valid, norm_pix)
    (want_grad,) = torch.autograd.grad(want, exact)
    with mae_kernels.backend(backend):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=norm_pix)
    (g,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), want_grad, atol=1e-7, rtol=1e-5)
    assert torch.equal(g[~valid], torch.zeros_like(g[~valid]))

    pred.detach()[0, 0, 2] = float("nan")  # a valid row: the loss is NaN, the invalid rows still get 0
    with mae_kernels.backend(backend):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=norm_pix)
    (g,) = torch.autograd.grad(loss, pred)
    assert loss.isnan() and g[0, 0, 2].isnan() and torch.equal(g[~valid], torch.zeros_like(g[~valid]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_patches_next_to_float32_pred_run_on_both_backends(backend):
    """patches may be any float dtype: float64 ones are compared in fp32 (pred's compute dtype) on both
    backends, instead of raising on the Triton one."""
    pred, patches, idx, valid = case(2, 12, 5, 16, valid_frac=0.7, seed=6)
    patches = patches.double() + 1e-9  # not exactly representable in fp32
    want = loss_over_valid_rows_float64(pred, patches, idx, valid, norm_pix=True)
    with mae_kernels.backend(backend):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-5)
    with mae_kernels.backend("torch"):
        other = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=True)
    torch.testing.assert_close(loss, other)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(other, pred)[0])


def test_strided_pred_and_int32_idx():
    wide = torch.randn(2, 9, 2, 64, device=DEVICE, requires_grad=True)
    pred = wide[:, :, 1]  # [2, 9, 64], row stride 128
    _, patches, idx, valid = case(2, 30, 9, 64, valid_frac=0.7, seed=2)
    with mae_kernels.backend("triton"):
        loss = mae_kernels.masked_mse_loss(pred, patches, idx.int(), valid, norm_pix=True, norm_groups=2)
    ref = masked_mse_loss_reference(pred, patches, idx, valid, norm_pix=True, norm_groups=2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, wide)[0], torch.autograd.grad(ref, wide)[0])


def test_loss_goes_down_under_gradient_descent():
    pred, patches, idx, valid = case(2, 40, 16, 64, valid_frac=0.8, seed=4)
    pred = pred.detach().requires_grad_()
    opt = torch.optim.SGD([pred], lr=400.0)  # the loss is a mean over ~1600 values
    losses = []
    with mae_kernels.backend("triton"):
        for _ in range(5):
            loss = mae_kernels.masked_mse_loss(pred, patches, idx, valid, norm_pix=True, norm_groups=4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@given(B=st.integers(1, 3), N=st.integers(1, 60), P=st.sampled_from([1, 3, 16, 40, 96, 130]),
       groups=st.sampled_from([1, 2, 3]), frac=st.floats(0.05, 1.0), use_valid=st.booleans(),
       norm_pix=st.booleans())
def test_fuzz_shapes(B, N, P, groups, frac, use_valid, norm_pix):
    if P % groups:
        groups = 1
    M = max(1, int(N * frac))
    pred, patches, idx, valid = case(B, N, M, P, valid_frac=0.5 if use_valid else None)
    check_against_reference(pred, patches, idx, valid, norm_groups=groups, norm_pix=norm_pix)


def test_reference_gradcheck():
    pred = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    patches = torch.randn(2, 5, 6, dtype=torch.float64)
    idx = torch.tensor([[0, 4, 2], [1, 3, 3]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda p: masked_mse_loss_reference(p, patches, idx, valid, norm_pix=True, norm_groups=2), (pred,))


def test_errors_name_the_argument():
    pred, patches, idx = torch.randn(2, 3, 8), torch.randn(2, 10, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"patches must be \[B=2, N, P=8\]"):
        mae_kernels.masked_mse_loss(pred, torch.randn(2, 10, 9), idx)
    with pytest.raises(ValueError, match="idx must have one entry per prediction row"):
        mae_kernels.masked_mse_loss(pred, patches, idx[:, :2])
    with pytest.raises(ValueError, match="idx values must lie"):
        mae_kernels.masked_mse_loss(pred, patches, idx + 10, validate=True)
    with pytest.raises(TypeError, match="idx must have dtype"):
        mae_kernels.masked_mse_loss(pred, patches, idx.to(torch.int16))
    with pytest.raises(TypeError, match="mask_to_indices"):
        mae_kernels.masked_mse_loss(pred, patches, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps_on must be 'var'"):
        mae_kernels.masked_mse_loss(pred, patches, idx, eps_on="sqrt")
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        mae_kernels.masked_mse_loss(pred, patches, idx, valid=torch.ones(2, 3))
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        mae_kernels.masked_mse_loss(pred, patches, idx, valid=[[True] * 3] * 2)
    with pytest.raises(ValueError, match=r"valid must have shape \[2, 3\]"):
        mae_kernels.masked_mse_loss(pred, patches, idx, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm_groups must be a positive integer dividing P=8"):
        mae_kernels.masked_mse_loss(pred, patches, idx, norm_groups=3)
    with pytest.raises(ValueError, match="pred must be 3-D"):
        mae_kernels.masked_mse_loss(pred[0], patches, idx)
    with pytest.raises(ValueError, match="patches must be"):
        mae_kernels.masked_mse_loss(pred, patches[:1], idx)
    for bad in ("1e-6", torch.tensor(1e-6), True, None):  # a tensor would be read back to the host
        with pytest.raises(TypeError, match="eps must be a float, got"):
            mae_kernels.masked_mse_loss(pred, patches, idx, eps=bad)
    for bad in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite positive number"):
            mae_kernels.masked_mse_loss(pred, patches, idx, eps=bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="norm_groups must be an int, got"):
            mae_kernels.masked_mse_loss(pred, patches, idx, norm_groups=bad)
    with pytest.raises(ValueError, match="norm_groups must be a positive integer"):
        mae_kernels.masked_mse_loss(pred, patches, idx, norm_groups=0)
    with pytest.raises(TypeError, match="eps_on must be a str"):
        mae_kernels.masked_mse_loss(pred, patches, idx, eps_on=None)


def test_cheap_checks_come_before_the_index_range_read(monkeypatch):
    """validate reads the index range back to the host: every other check comes first, so a bad
    argument is named without a sync (here: without reaching the range read at all)."""
    pred, patches, idx = torch.randn(2, 3, 8), torch.randn(2, 10, 8), torch.zeros(2, 3, dtype=torch.long)
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("index range read before the cheap checks"))
    out_of_range = idx + 10
    with pytest.raises(ValueError, match=r"valid must have shape \[2, 3\]"):
        mae_kernels.masked_mse_loss(pred, patches, out_of_range, torch.ones(2, 4, dtype=torch.bool), validate=True)
    with pytest.raises(ValueError, match="idx must have one entry per prediction row"):
        mae_kernels.masked_mse_loss(pred, patches, out_of_range[:, :2], validate=True)
    with pytest.raises(TypeError, match="eps must be a float"):
        mae_kernels.masked_mse_loss(pred, patches, out_of_range, eps="1e-6", validate=True)
