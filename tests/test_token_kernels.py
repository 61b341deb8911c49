"""gather_tokens and assemble_decoder_tokens: Triton (interpreter on CPU) against the torch reference."""

import importlib
import math

import mae_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mae_kernels.assemble_decoder_tokens import assemble_decoder_tokens_reference
from mae_kernels.gather_tokens import gather_tokens_reference

from tests.conftest import DEVICE, INTERPRETED

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def unique_idx(B, N, M, dtype=torch.int64, sort=True, gen=None):
    idx = torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(B)])
    if sort:
        idx = idx.sort(dim=1).values
    return idx.to(dtype).to(DEVICE)


def assert_bitwise_or_bf16_ulp(out, ref):
    """Bit-equal, except bf16 under the interpreter, which truncates fp32 -> bf16 instead of rounding."""
    if INTERPRETED and out.dtype == torch.bfloat16:
        torch.testing.assert_close(out, ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(out, ref), "forward is data movement plus one add: must be bit-equal"


def grad_tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()


def grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


# --- gather_tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,M,C", [(2, 800, 80, 40), (1, 128, 24, 200), (3, 128, 1, 64), (2, 50, 13, 1536)])
@pytest.mark.parametrize("pos_kind", [None, "shared", "batched"])
def test_gather_matches_reference(triton_backend, dtype, B, N, M, C, pos_kind):
    x = leaf(B, N, C, dtype=dtype)
    pos = None if pos_kind is None else leaf(*((N, C) if pos_kind == "shared" else (B, N, C)), dtype=dtype)
    idx = unique_idx(B, N, M)
    out = mae_kernels.gather_tokens(x, idx, pos)
    ref = gather_tokens_reference(x, idx, pos)
    assert out.dtype == dtype and out.shape == (B, M, C) and out.is_contiguous()
    assert_bitwise_or_bf16_ulp(out, ref)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, (x, pos), g), grads(ref, (x, pos), g)):
        torch.testing.assert_close(got, want, atol=grad_tol(dtype)[0], rtol=grad_tol(dtype)[1])


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gather_repeated_unsorted_indices_sum_gradients(triton_backend, idx_dtype):
    x = leaf(2, 10, 40)
    pos = leaf(10, 40)
    idx = torch.tensor([[3, 3, 9, 0, 3], [1, 1, 1, 1, 1]], dtype=idx_dtype, device=DEVICE)
    out = mae_kernels.gather_tokens(x, idx, pos)
    g = torch.randn_like(out)
    gx, gpos = torch.autograd.grad(out, (x, pos), g)
    torch.testing.assert_close(gx[0, 3], g[0, 0] + g[0, 1] + g[0, 4])
    torch.testing.assert_close(gx[1, 1], g[1].sum(0))
    assert torch.count_nonzero(gx[0, [1, 2, 4, 5, 6, 7, 8]]) == 0, "rows nobody reads get zero gradient"
    torch.testing.assert_close(gpos[1], g[1].sum(0))
    torch.testing.assert_close(gpos[3], g[0, 0] + g[0, 1] + g[0, 4])


def test_gather_non_contiguous_inputs(triton_backend):
    base = torch.randn(3, 40, 2, 96, device=DEVICE)
    x = base[:, :, 1, ::2].requires_grad_()  # [3, 40, 48] with strides (7680, 192, 2)
    x = x.detach().requires_grad_() if x.is_leaf else x
    pos = torch.randn(48, 40, device=DEVICE).t().requires_grad_()  # transposed: stride (1, 48)
    idx = unique_idx(3, 40, 10).t().contiguous().t()  # column-major idx
    assert not x.is_contiguous() and not pos.is_contiguous() and not idx.is_contiguous()
    out = mae_kernels.gather_tokens(x, idx, pos)
    ref = gather_tokens_reference(x, idx, pos)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (gx, gpos), (rx, rpos) = torch.autograd.grad(out, (x, pos), g), torch.autograd.grad(ref, (x, pos), g)
    assert gx.shape == x.shape and gpos.shape == pos.shape
    torch.testing.assert_close(gx, rx, atol=0, rtol=0)  # unique rows: each gradient row is one row of g, copied
    torch.testing.assert_close(gpos, rpos)


def test_gather_only_pos_requires_grad(triton_backend):
    x = torch.randn(2, 30, 40, device=DEVICE)
    pos = leaf(30, 40)
    idx = unique_idx(2, 30, 7)
    (gpos,) = torch.autograd.grad(mae_kernels.gather_tokens(x, idx, pos).sum(), pos)
    (want,) = torch.autograd.grad(gather_tokens_reference(x, idx, pos).sum(), pos)
    torch.testing.assert_close(gpos, want)


@given(B=st.integers(1, 3), N=st.integers(1, 70), C=st.integers(1, 300), frac=st.floats(0.01, 1.0),
       shared=st.booleans())
def test_gather_fuzz_shapes(B, N, C, frac, shared):
    M = max(1, int(N * frac))
    x = leaf(B, N, C)
    pos = leaf(N, C) if shared else leaf(B, N, C)
    idx = torch.randint(0, N, (B, M), device=DEVICE)  # repeats allowed
    with mae_kernels.backend("triton"):
        out = mae_kernels.gather_tokens(x, idx, pos)
    ref = gather_tokens_reference(x, idx, pos)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, (x, pos), g), grads(ref, (x, pos), g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gather_reference_gradcheck():
    x = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 4, 8], [2, 3, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, p: gather_tokens_reference(a, idx, p), (x, pos))


# --- assemble_decoder_tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,ME,MD,C", [(2, 800, 80, 400, 40), (1, 128, 24, 64, 200), (2, 16, 1, 1, 1536)])
@pytest.mark.parametrize("token_shape", [(-1,), (1, 1, -1)])
def test_assemble_matches_reference(triton_backend, dtype, B, N, ME, MD, C, token_shape):
    enc = leaf(B, ME, C, dtype=dtype)
    token = torch.randn(C, device=DEVICE).to(dtype).reshape(token_shape).requires_grad_()
    pos = leaf(N, C, dtype=dtype)
    enc_idx, dec_idx = unique_idx(B, N, ME), unique_idx(B, N, MD)  # independent masks: positions overlap
    out = mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx)
    ref = assemble_decoder_tokens_reference(enc, token, pos, enc_idx, dec_idx)
    assert out.shape == (B, ME + MD, C) and out.dtype == dtype
    assert_bitwise_or_bf16_ulp(out, ref)
    g = torch.randn_like(out)
    atol, rtol = grad_tol(dtype)
    g_enc, g_token, g_pos = grads(out, (enc, token, pos), g)
    r_enc, r_token, r_pos = grads(ref, (enc, token, pos), g)
    assert (g_enc.shape, g_token.shape, g_pos.shape) == (enc.shape, token.shape, pos.shape)
    # enc's gradient is rows of g copied, pos's sums at most two rows (one encoder, one decoder use of a
    # position): both held to the dtype's usual tolerance
    torch.testing.assert_close(g_enc, r_enc, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_pos, r_pos, atol=atol, rtol=rtol)
    # only the mask-token gradient is a long sum (B*MD rows, up to 800 here): the kernel's fp32 accumulation
    # order differs from torch's reduction, and in fp16/bf16 the rounding of that sum grows with the row count
    torch.testing.assert_close(g_token, r_token, atol=atol * 20, rtol=rtol * 10)


@pytest.mark.parametrize("token_shape", [(-1,), (1, -1), (1, 1, -1)])
def test_assemble_float64_mask_token_gradient_is_summed_in_float64(token_shape):
    """float64 runs the reference for gradchecks: the token's gradient (a sum over B * Md rows) must not
    pass through fp32 on the way."""
    B, N, ME, MD, C = 3, 40, 4, 30, 6
    gen = torch.Generator().manual_seed(7)
    enc = torch.randn(B, ME, C, generator=gen, dtype=torch.float64).to(DEVICE)
    token = torch.randn(C, generator=gen, dtype=torch.float64).to(DEVICE).reshape(token_shape).requires_grad_()
    pos = torch.randn(N, C, generator=gen, dtype=torch.float64).to(DEVICE)
    g = (torch.randn(B, ME + MD, C, generator=gen, dtype=torch.float64) * 1e3 + 1 / 3).to(DEVICE)
    out = mae_kernels.assemble_decoder_tokens(enc, token, pos, unique_idx(B, N, ME), unique_idx(B, N, MD))
    (g_token,) = torch.autograd.grad(out, token, g)
    exact = [math.fsum(g[:, ME:, c].flatten().tolist()) for c in range(C)]  # correctly rounded sums
    assert g_token.dtype == torch.float64 and g_token.shape == token.shape
    want = torch.tensor(exact, dtype=torch.float64)
    torch.testing.assert_close(g_token.flatten().cpu(), want, atol=1e-12, rtol=1e-15)


def test_assemble_batched_pos_and_int32(triton_backend):
    B, N, C = 2, 60, 48
    enc, token, pos = leaf(B, 5, C), leaf(1, C), leaf(B, N, C)
    enc_idx = unique_idx(B, N, 5, torch.int32)
    dec_idx = unique_idx(B, N, 30, torch.int32)
    out = mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx)
    ref = assemble_decoder_tokens_reference(enc, token, pos, enc_idx, dec_idx)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, (enc, token, pos), g), grads(ref, (enc, token, pos), g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_assemble_strided_encoder_output(triton_backend):
    wide = torch.randn(2, 12, 80, device=DEVICE, requires_grad=True)
    enc = wide[:, ::2, :40]  # every other token, first half of the channels
    token, pos = leaf(40), leaf(30, 40)
    enc_idx, dec_idx = unique_idx(2, 30, 6), unique_idx(2, 30, 9)
    out = mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx)
    ref = assemble_decoder_tokens_reference(enc, token, pos, enc_idx, dec_idx)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, wide, g)
    (rw,) = torch.autograd.grad(ref, wide, g)
    torch.testing.assert_close(gw, rw)


def test_assemble_reference_gradcheck():
    enc = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    enc_idx, dec_idx = torch.tensor([[0, 2, 5], [1, 2, 3]]), torch.tensor([[2, 6], [0, 1]])
    assert torch.autograd.gradcheck(
        lambda e, t, p: assemble_decoder_tokens_reference(e, t, p, enc_idx, dec_idx), (enc, token, pos))


# --- errors -----------------------------------------------------------------------------------------


def test_gather_errors_name_the_argument():
    x = torch.randn(2, 10, 8)
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="x must be 3-D"):
        mae_kernels.gather_tokens(x[0], idx)
    with pytest.raises(TypeError, match="idx must have dtype"):
        mae_kernels.gather_tokens(x, idx.float())
    with pytest.raises(ValueError, match="idx must have batch size 2"):
        mae_kernels.gather_tokens(x, idx[:1])
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 10\)"):
        mae_kernels.gather_tokens(x, idx + 10, validate=True)
    with pytest.raises(ValueError, match=r"idx values must lie"):
        mae_kernels.gather_tokens(x, idx - 1, validate=True)
    with pytest.raises(TypeError, match="mask_to_indices"):
        mae_kernels.gather_tokens(x, torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pos must have shape \[10, 8\], \[1, 10, 8\]"):
        mae_kernels.gather_tokens(x, idx, torch.randn(10, 9))
    with pytest.raises(TypeError, match="cast pos to float64"):
        mae_kernels.gather_tokens(x.double(), idx, torch.randn(10, 8))
    with pytest.raises(TypeError, match="x must have dtype"):
        mae_kernels.gather_tokens(x.to(torch.int32), idx)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mae_kernels.gather_tokens(x.numpy(), idx)
    with pytest.raises(TypeError, match="pos must be a torch.Tensor"):
        mae_kernels.gather_tokens(x, idx, pos=[0.0] * 8)


def test_assemble_errors_name_the_argument():
    enc, token, pos = torch.randn(2, 3, 8), torch.randn(8), torch.randn(10, 8)
    eidx, didx = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mask_token must hold C=8"):
        mae_kernels.assemble_decoder_tokens(enc, torch.randn(9), pos, eidx, didx)
    for shape in ((2, 4), (8, 1), (1, 2, 4)):  # C values, but not a [C], [1, C] or [1, 1, C] token
        with pytest.raises(ValueError, match=r"mask_token must hold C=8 values with shape \[8\], \[1, 8\]"):
            mae_kernels.assemble_decoder_tokens(enc, torch.randn(shape), pos, eidx, didx)
    with pytest.raises(ValueError, match="enc_idx must list one position per encoder token"):
        mae_kernels.assemble_decoder_tokens(enc, token, pos, eidx[:, :2], didx)
    with pytest.raises(ValueError, match="dec_idx values must lie"):
        mae_kernels.assemble_decoder_tokens(enc, token, pos, eidx, didx + 10, validate=True)
    with pytest.raises(ValueError, match="dec_idx must have batch size"):
        mae_kernels.assemble_decoder_tokens(enc, token, pos, eidx, didx[:1])
    with pytest.raises(TypeError, match="cast mask_token to float64"):
        mae_kernels.assemble_decoder_tokens(enc.double(), token, pos.double(), eidx, didx)
    with pytest.raises(ValueError, match="pos must have shape"):
        mae_kernels.assemble_decoder_tokens(enc, token, torch.randn(3, 10, 8), eidx, didx)


def test_token_ops_check_everything_before_casting_or_reading_index_ranges(monkeypatch):
    """Cheap checks first: no parameter is cast and no index range is read back to the host (validate)
    before every shape/dtype check has passed."""
    def refuse(*args, **kwargs):
        pytest.fail("work done before the cheap checks")

    monkeypatch.setattr(torch, "aminmax", refuse)
    for module in ("assemble_decoder_tokens", "gather_tokens"):  # the modules, which share their op's name
        monkeypatch.setattr(importlib.import_module(f"mae_kernels.{module}"), "match_dtype", refuse)
    x, token, pos = torch.randn(2, 3, 8, dtype=torch.float16), torch.randn(8), torch.randn(10, 8)
    eidx, didx = torch.zeros(2, 3, dtype=torch.long) + 10, torch.zeros(2, 4, dtype=torch.long) + 10
    with pytest.raises(ValueError, match="enc_idx must list one position per encoder token"):
        mae_kernels.assemble_decoder_tokens(x, token, pos, eidx[:, :2], didx, validate=True)
    with pytest.raises(TypeError, match="dec_idx must have dtype"):
        mae_kernels.assemble_decoder_tokens(x, token, pos, eidx, didx.float(), validate=True)
    with pytest.raises(TypeError, match="cast pos to float64"):
        mae_kernels.assemble_decoder_tokens(x.double(), token.double(), pos, eidx, didx, validate=True)
    rows = torch.randn(2, 10, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="pos must have shape"):
        mae_kernels.gather_tokens(rows, eidx, torch.randn(10, 9), validate=True)
    with pytest.raises(TypeError, match="cast pos to float64"):
        mae_kernels.gather_tokens(rows.double(), eidx, pos, validate=True)


# --- dispatch ---------------------------------------------------------------------------------------


def test_interpreter_refuses_a_numpy_its_triton_cannot_run_with(monkeypatch):
    # Triton < 3.7's interpreter turns loop bounds into ints in a way numpy 2.4 refuses: every kernel
    # would fail deep inside Triton; the dispatcher names the clash instead (triton-lang/triton#9171)
    import importlib.metadata

    from mae_kernels import _requirements, dispatch

    clash = _requirements.interpreter_numpy_clash
    assert clash("3.6.0", "2.4.6") and clash("3.0.0", "2.5.5") and clash("3.6.0+git1234", "2.4.0rc1")
    assert not clash("3.7.0", "2.5.5") and not clash("3.6.0", "2.2.6") and not clash("3.10.1", "2.4.0")
    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(importlib.metadata, "version", versions.__getitem__)
    message = dispatch._interpreter_blocker()
    assert "Triton 3.6.0" in message and "numpy 2.4.6" in message and "triton>=3.7 or numpy<2.4" in message
    monkeypatch.setattr(dispatch, "_INTERPRETER_BLOCKER", message)
    monkeypatch.setattr(dispatch, "_INTERPRETED_AT_IMPORT", True)  # as on CPU; on a GPU machine it is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "auto")
    with pytest.raises(RuntimeError, match="numpy 2.4 refuses"):
        dispatch.use_triton(torch.zeros(1))
    versions["numpy"] = "2.2.6"
    assert dispatch._interpreter_blocker() is None


def test_dispatch_choice(monkeypatch):
    from mae_kernels import dispatch

    cpu = torch.zeros(1)
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "torch")
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.use_triton(cpu) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_INTERPRETED_AT_IMPORT", False)  # switched on after import: told so
    with pytest.raises(RuntimeError, match="set after mae_kernels was imported"):
        dispatch.use_triton(cpu)
    monkeypatch.setattr(dispatch, "_INTERPRETED_AT_IMPORT", True)  # as conftest.py does, before the import
    assert dispatch.use_triton(cpu) is True
    with mae_kernels.backend("torch"):
        assert not dispatch.use_triton(cpu), "the context manager wins over the environment"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dispatch.use_triton(cpu)
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MAE_KERNELS_BACKEND must be one of"):
        dispatch.use_triton(cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        with mae_kernels.backend("fast"):
            pass
    with pytest.raises(TypeError, match="backend name must be a str"):
        with mae_kernels.backend(None):
            pass


def test_backend_names_are_case_insensitive_in_the_context_manager_and_the_environment(monkeypatch):
    from mae_kernels import dispatch

    for spelled in ("Torch", "TORCH", " torch "):
        monkeypatch.setenv("MAE_KERNELS_BACKEND", spelled)
        assert dispatch.requested_backend() == "torch"
        monkeypatch.setenv("MAE_KERNELS_BACKEND", "triton")
        with mae_kernels.backend(spelled):
            assert dispatch.requested_backend() == "torch"


def test_kernels_package_stands_alone(tmp_path):
    """mae_kernels imports without avfmae, and the distribution installs no top-level `kernels`."""
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys, importlib.util, mae_kernels; assert 'avfmae' not in sys.modules, 'imports avfmae'; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else 'none')")
    # run outside the checkout so the working directory does not put ./kernels on sys.path
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True)
    origin = out.stdout.strip()
    assert origin == "none" or not origin.startswith(str(repo)), f"`import kernels` resolves to {origin}"
