"""grouped_attention: Triton (interpreter on CPU) against the SDPA reference, values and gradients.

Inputs are laid out as the model hands them over: q, k, v are strided views of one fused projection
(cross attention: q alone, k and v from a fused kv projection), never copies. Every dtype passes
FlashAttention's criterion (error vs a wider ground truth at most twice PyTorch's own error in that
dtype, plus one ulp of the output); fp32 may instead be within 2e-5 of its float64 truth. Each bound
covers the other's blind spot: where an exact result is 0 (one key: dk = 0) only rounding is left,
which grows with Lq and the scale and differs between Triton releases; where torch's own error is
tiny, 2e-5 is the looser one. bf16 runs on a GPU only: the interpreter's tl.dot on bf16 operands
returns garbage (it multiplies the raw 16-bit patterns).
"""

import importlib
import math

import mae_kernels
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from mae_kernels.grouped_attention import SUPPORTED_HEAD_DIMS, grouped_attention_reference

from avfmae.config import get_config
from avfmae.lgi_former import attention_shapes
from tests.conftest import DEVICE, skip_bf16_if_interpreted

# the module itself: `import mae_kernels.grouped_attention as ga` would bind the function of that name
ga = importlib.import_module("mae_kernels.grouped_attention")

# every LGI-Former stage shape (G, Lq, Lk), pre-training and fine-tuning, from the model's own geometry
STAGES = attention_shapes(get_config("base"))


def assert_close_fp32(got, want, name="", tol=2e-5):
    """Relative to the tensor's largest entry (at least 1: dq is exactly 0 when Lk = 1), since large logits
    and long reductions scale the rounding error."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.to(want.dtype), want, atol=tol * scale, rtol=tol,
                               msg=lambda m, name=name: f"{name}: {m}")


def make_qkv(B, G, Lq, Lk, H, D, dtype=torch.float32, seed=0):
    """q, k, v as views into fused projections, like avfmae.layers; all three require grad."""
    gen = torch.Generator().manual_seed(seed)
    if Lq == Lk:
        qkv = torch.randn(B, G, Lq, 3, H, D, generator=gen).to(DEVICE, dtype).requires_grad_()
        return qkv.unbind(3)
    q = torch.randn(B, G, Lq, H, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    kv = torch.randn(B, G, Lk, 2, H, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    return (q, *kv.unbind(3))


def out_and_grads(fn, q, k, v, g, scale=None):
    out = fn(q, k, v, scale)
    return [out, *torch.autograd.grad(out, (q, k, v), g)]


def triton_attention(q, k, v, scale=None):
    with mae_kernels.backend("triton"):
        return mae_kernels.grouped_attention(q, k, v, scale)


def check_against_reference(q, k, v, scale=None, seed=1):
    """Output and dq, dk, dv of the Triton path against the reference (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    got = out_and_grads(triton_attention, q, k, v, g, scale)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype and got[0].is_contiguous()
    for t, x in zip(got[1:], (q, k, v)):
        assert t.shape == x.shape and t.dtype == x.dtype
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    up = [x.detach().to(wide).requires_grad_() for x in (q, k, v)]
    truth = out_and_grads(grouped_attention_reference, *up, g.to(wide), scale)
    names = ("out", "dq", "dk", "dv")
    same = out_and_grads(grouped_attention_reference, q, k, v, g, scale)
    ulp = torch.finfo(q.dtype).eps
    for name, a, b, c in zip(names, got, truth, same):
        err = (a.float() - b).abs().max().item()
        torch_err = (c.float() - b).abs().max().item()
        bound = 2 * torch_err + ulp * b.abs().max().item()
        if err <= bound:  # FlashAttention's criterion, every dtype
            continue
        assert q.dtype == torch.float32, \
            f"{name} ({q.dtype}): max error {err:.3g} > {bound:.3g} (torch's {torch_err:.3g})"
        assert_close_fp32(a, b, name)


# --- every LGI stage shape, every tiling -------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_stage_shapes_fp32(stage):
    G, Lq, Lk = STAGES[stage]
    H = 1 if Lq > 64 and Lk > 64 else 2  # the 101-token stage loops over 4x4 tiles: keep it to 8 groups
    check_against_reference(*make_qkv(1, G, Lq, Lk, H, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G,Lq,Lk", [STAGES["I-video-pretrain"], STAGES["III-video-pretrain"],
                                     STAGES["IV-video-pretrain"], (2, 101, 101)])
def test_stage_shapes_half(dtype, G, Lq, Lk):
    skip_bf16_if_interpreted(dtype)
    check_against_reference(*make_qkv(1, G, Lq, Lk, 2, 64, dtype))


@pytest.mark.parametrize("L", [1, 3, 64, 65, 129])
def test_odd_lengths(L):
    assert ga.packs(L, L) == (L <= 64)
    check_against_reference(*make_qkv(1, 2, L, L, 1, 32))


@pytest.mark.parametrize("D", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("Lq,Lk", [(5, 5), (70, 33)], ids=["packed", "looped"])
def test_head_dims(D, Lq, Lk):
    check_against_reference(*make_qkv(1, 2, Lq, Lk, 1, D))


@pytest.mark.parametrize("scale", [0.05, 0.7, 8.0])
@pytest.mark.parametrize("Lq,Lk", [(11, 11), (70, 70)], ids=["packed", "looped"])
def test_non_default_scale(scale, Lq, Lk):
    """8.0 at D=32 gives logits up to ~200, past where exp overflows fp32: the running max keeps it finite."""
    check_against_reference(*make_qkv(1, 2, Lq, Lk, 2, 32), scale=scale)


def test_batch_and_heads_flatten_correctly():
    """B > 1 with G and H > 1: every (b, g, h) finds its own rows in both tilings."""
    check_against_reference(*make_qkv(3, 2, 6, 6, 3, 16))
    check_against_reference(*make_qkv(2, 3, 66, 9, 2, 16))


@pytest.mark.parametrize("tile,G,Lq,Lk,H", [
    ((16, 16), 5, 4, 4, 1),    # 4 groups per tile, 5 groups: the second tile holds one
    ((32, 32), 7, 5, 5, 1),    # 6 per tile, 7 groups
    ((32, 16), 3, 8, 3, 2),    # Lq != Lk: 4 groups per tile limited by queries, key tile 12 of 16 rows
    ((16, 32), 3, 3, 8, 2),    # ... and limited by keys
    ((16, 16), 4, 11, 11, 1),  # one group per tile, 5 padding rows
    ((16, 16), 3, 16, 16, 1),  # one group filling the tile exactly
])
def test_packed_tilings(monkeypatch, tile, G, Lq, Lk, H):
    monkeypatch.setitem(ga.INTERPRETER_TILES, "packed", tile)
    gpt = ga.groups_per_tile(Lq, Lk, *tile)
    assert ga.packs(Lq, Lk) and gpt >= 1
    if gpt > 1:
        assert (G * H) % gpt != 0, "the last tile must be partly empty"
    check_against_reference(*make_qkv(1, G, Lq, Lk, H, 16))


@pytest.mark.parametrize("tile,Lq,Lk", [
    ((16, 16), 65, 65), ((16, 32), 70, 40), ((32, 16), 40, 70), ((64, 16), 100, 66), ((16, 16), 65, 1),
])
def test_looped_tilings(monkeypatch, tile, Lq, Lk):
    """Several query and key blocks per group, partial last blocks, BLOCK_M != BLOCK_N."""
    monkeypatch.setitem(ga.INTERPRETER_TILES, "looped", tile)
    assert not ga.packs(Lq, Lk)
    check_against_reference(*make_qkv(1, 2, Lq, Lk, 1, 16))


# no shrinking: every example runs the interpreter, and shrinking a failure took minutes; the failing
# example is still reported (and replayed first on the next run)
@pytest.mark.slow
@settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(B=st.integers(1, 2), G=st.integers(1, 3), Lq=st.integers(1, 80), Lk=st.integers(1, 80),
       H=st.integers(1, 2), D=st.sampled_from(SUPPORTED_HEAD_DIMS), scale=st.none() | st.floats(0.05, 2.0))
def test_fuzz_shapes(B, G, Lq, Lk, H, D, scale):
    check_against_reference(*make_qkv(B, G, Lq, Lk, H, D), scale=scale)


# --- strided inputs, gradients through the fused projection ------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the (q, k, v) every Triton forward launch receives."""
    calls = []
    forward = ga._attention_forward
    monkeypatch.setattr(ga, "_attention_forward", lambda q, k, v, s: calls.append((q, k, v)) or forward(q, k, v, s))
    return calls


@pytest.mark.parametrize("L", [11, 70])
def test_fused_qkv_projection_is_read_in_place(kernel_calls, L):
    """q/k/v = linear(x).view(B, G, L, 3, H, D).unbind(3): the kernels get the views themselves (no copy),
    and the gradients of x, the weight and the bias match the reference path."""
    B, G, H, D = 1, 2, 2, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, G, L, H * D, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(3 * H * D, H * D, generator=gen) / math.sqrt(H * D)).to(DEVICE).requires_grad_()
    b = torch.randn(3 * H * D, generator=gen).to(DEVICE).requires_grad_()

    def run(fn):
        qkv = torch.nn.functional.linear(x, w, b)
        q, k, v = qkv.view(B, G, L, 3, H, D).unbind(3)
        out = fn(q, k, v)
        return (q, k, v), [out, *torch.autograd.grad(out.square().sum(), (x, w, b))]

    views, got = run(triton_attention)
    _, want = run(grouped_attention_reference)
    assert len(kernel_calls) == 1
    for passed, view in zip(kernel_calls[0], views):
        assert passed.data_ptr() == view.data_ptr() and passed.stride() == view.stride()
        assert not passed.is_contiguous()
    for a, c in zip(got, want):
        assert_close_fp32(a, c)


@pytest.mark.parametrize("L", [7, 70])
def test_transposed_head_dim_and_strided_grad_out(L):
    """D not innermost (stride H), and incoming gradients that are transposed or broadcast (stride 0)."""
    B, G, H, D = 1, 2, 2 if L <= 64 else 1, 16
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(B, G, L, 3, D, H, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = base.transpose(-1, -2).unbind(3)
    assert q.stride(-1) == H
    before = base.detach().clone()
    check_against_reference(q, k, v)
    assert torch.equal(base.detach(), before), "the kernels must not write into their inputs"
    g_t = torch.randn(B, G, H, L, D, generator=gen).to(DEVICE).transpose(2, 3)
    for g in (g_t, None):  # None: out.sum() hands backward an expanded (stride-0) gradient
        grads = []
        for fn in (triton_attention, grouped_attention_reference):
            out = fn(q, k, v)
            grads.append(torch.autograd.grad(out if g is not None else out.sum(), (q, k, v), g))
        for a, c in zip(*grads):
            assert_close_fp32(a, c)


def test_only_some_inputs_require_grad():
    q, k, v = make_qkv(1, 2, 9, 9, 2, 16)
    q, v = q.detach(), v.detach()
    (gk,) = torch.autograd.grad(triton_attention(q, k, v).sum(), k)
    (want,) = torch.autograd.grad(grouped_attention_reference(q, k, v).sum(), k)
    assert_close_fp32(gk, want)


def test_not_twice_differentiable():
    q, k, v = make_qkv(1, 1, 4, 4, 1, 16)
    (gq,) = torch.autograd.grad(triton_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="grouped_attention_backward.* no autograd formula"):
        gq.sum().backward()


# --- reference ---------------------------------------------------------------------------------------


def test_reference_gradcheck():
    # fast mode (random projections of the Jacobian): the full Jacobian takes ~4 s of tiny SDPA calls here
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    kv = torch.randn(1, 2, 5, 2, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_attention_reference(a, *b.unbind(3), scale=0.8), (q, kv),
                                    fast_mode=True)


def test_reference_is_attention_within_groups():
    """Pins the reference to the formula: a loop over groups of softmax(q k^T * scale) v."""
    q, k, v = (x.detach() for x in make_qkv(2, 3, 5, 7, 2, 16))
    got = grouped_attention_reference(q, k, v, scale=0.3)
    for b in range(2):
        for g in range(3):
            for h in range(2):
                p = torch.softmax(q[b, g, :, h] @ k[b, g, :, h].T * 0.3, dim=-1)
                torch.testing.assert_close(got[b, g, :, h], p @ v[b, g, :, h])


# --- non-finite inputs -------------------------------------------------------------------------------


def _math_attention(q, k, v, scale):
    """softmax(q k^T * scale) v per group by the formula, which carries NaN the way the maths does."""
    s = torch.einsum("bgihd,bgjhd->bghij", q, k) * scale
    return torch.einsum("bghij,bgjhd->bgihd", torch.softmax(s, dim=-1), v)


def _poisoned_group_mask(shape, b, g, h):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[b, g, :, h] = True
    return mask


def _check_nan_contract(got, want, own, packs_leak):
    """got has NaN exactly where want (the formula) has, inside the poisoned group ``own``, and equals want
    wherever both are finite. Outside it: the same, except that Triton's packed tiles may add NaN to the
    other groups of the pack (``packs_leak``): never fewer NaN than the formula."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a = a.cpu().double()
        assert torch.equal(a.isnan()[own], b.isnan()[own]), f"{name}: NaN pattern differs from the maths"
        if packs_leak:
            assert not (b.isnan() & ~a.isnan()).any(), f"{name}: a NaN of the formula was lost"
        else:
            assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN outside the poisoned group"
        both = ~a.isnan() & ~b.isnan()
        assert both.sum() > a.numel() // 2, f"{name}: too few finite values left to compare"
        assert_close_fp32(a[both], b[both], name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("L", [pytest.param(5, id="packed"), pytest.param(70, id="looped", marks=pytest.mark.slow)])
def test_nan_gives_the_maths_nan_pattern(backend, where, L):
    """A NaN in one entry of one (b, g, h) group: output and gradients are NaN where the formula's are
    (float64 ground truth) and equal to it elsewhere. torch's CPU kernel returned 0 for a NaN query row,
    and the Triton forward made a NaN softmax sum finite (so half the backward was finite): both fixed.
    Packed Triton tiles may spread the NaN to the other groups of their pack (docs/design-notes.md)."""
    B, G, H, D = 2, 8, 2, 16  # 32 groups: packed, 12 a pack at the interpreter's 64-row tile
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, G, L, H, D, generator=gen) for _ in range(4))
    dict(q=q, k=k, v=v, grad_out=g)[where][1, 7, 3, 0, 5] = float("nan")
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    with mae_kernels.backend(backend):
        got = out_and_grads(lambda *a: mae_kernels.grouped_attention(*a), *leaves, g.to(DEVICE))
    wide = [x.double().requires_grad_() for x in (q, k, v)]
    want = out_and_grads(_math_attention, *wide, g.double(), 1 / math.sqrt(D))
    assert want[3 if where == "grad_out" else 0].isnan().any(), "the NaN must reach the maths' results"
    own = _poisoned_group_mask(q.shape, 1, 7, 0)
    _check_nan_contract(got, want, own, packs_leak=backend == "triton" and ga.packs(L, L))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("L", [pytest.param(5, id="packed"), pytest.param(70, id="looped", marks=pytest.mark.slow)])
def test_infinity_makes_its_group_non_finite(backend, L):
    """An infinite entry leaves its own group non-finite somewhere and, outside the pack, every other group
    as it was without it (whether it shows as inf or NaN inside is the arithmetic's business)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, g = (torch.randn(2, 8, L, 2, 16, generator=gen) for _ in range(4))
    bad = [x.clone() for x in (q, k, v, g)]
    for x in bad:
        x[0, 1, 2, 1, 3] = float("inf")
    runs = []
    for tensors in ((q, k, v, g), bad):
        leaves = [x.to(DEVICE).requires_grad_() for x in tensors[:3]]
        with mae_kernels.backend(backend):
            runs.append(out_and_grads(lambda *a: mae_kernels.grouped_attention(*a), *leaves, tensors[3].to(DEVICE)))
    own = _poisoned_group_mask(q.shape, 0, 1, 1)
    leaks = backend == "triton" and ga.packs(L, L)
    for name, clean, poisoned in zip(("out", "dq", "dk", "dv"), *runs):
        clean, poisoned = clean.cpu(), poisoned.cpu()
        assert not poisoned[own].isfinite().all(), name
        others = ~own & (poisoned.isfinite() if leaks else torch.ones_like(own))
        torch.testing.assert_close(poisoned[others], clean[others], msg=lambda m, name=name: f"{name}: {m}")

# --- errors ------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 5, 2, 16)
    k = torch.randn(1, 2, 7, 2, 16)
    cases = [
        (ValueError, "q must be 5-D", (q[0], k, k)),
        (ValueError, "k must be 5-D", (q, k.unsqueeze(0), k)),
        (TypeError, "v must be a torch.Tensor", (q, k, k.numpy())),
        (TypeError, "q must have dtype", (q.int(), k.int(), k.int())),
        (TypeError, "share one dtype.*k: torch.float16", (q, k.half(), k)),
        (ValueError, "one device", (q, k, torch.empty(k.shape, device="meta"))),
        (ValueError, "k and v must have the same shape", (q, k, k[:, :, :6])),
        (ValueError, r"k/v must be \[B=1, G=2, Lk, H=2, D=16\]", (q, k[..., :1, :], k[..., :1, :])),
        (ValueError, "k/v must be", (q, k[:, :1], k[:, :1])),
        (ValueError, "k/v must be", (q, k.expand(3, -1, -1, -1, -1), k.expand(3, -1, -1, -1, -1))),
        (ValueError, "empty groups", (q[:, :, :0], k, k)),
        (ValueError, "empty groups", (q, k[:, :, :0], k[:, :, :0])),
        (ValueError, "empty groups", (q[:, :0], k[:, :0], k[:, :0])),
        (ValueError, "empty groups", (q[..., :0], k[..., :0], k[..., :0])),
    ]
    for backend in ("torch", "triton"):
        with mae_kernels.backend(backend):
            for exc, match, args in cases:
                with pytest.raises(exc, match=match):
                    mae_kernels.grouped_attention(*args)
            for bad in (0.0, -1.0, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="scale must be a finite positive number"):
                    mae_kernels.grouped_attention(q, k, k, scale=bad)
            with pytest.raises(TypeError, match="scale must be a float or None, got str"):
                mae_kernels.grouped_attention(q, k, k, scale="0.5")
            for bad in ("0.1", True, torch.tensor(0.1), None):  # wrong type: TypeError, as for scale
                with pytest.raises(TypeError, match="dropout_p must be a float, got"):
                    mae_kernels.grouped_attention(q, k, k, dropout_p=bad)
            for bad in (-0.1, 1.0, float("nan")):
                with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
                    mae_kernels.grouped_attention(q, k, k, dropout_p=bad)


# --- dispatch ----------------------------------------------------------------------------------------


def test_dispatch_torch_backend_runs_the_reference(monkeypatch, kernel_calls):
    q, k, v = make_qkv(1, 2, 6, 6, 2, 16)
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "torch")
    out = mae_kernels.grouped_attention(q, k, v)
    assert not kernel_calls and torch.equal(out, grouped_attention_reference(q, k, v))
    if DEVICE == "cpu":  # auto on CPU without the interpreter: the reference too
        monkeypatch.setenv("MAE_KERNELS_BACKEND", "auto")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert torch.equal(mae_kernels.grouped_attention(q, k, v), out) and not kernel_calls
        with mae_kernels.backend("triton"), pytest.raises(ValueError, match="needs CUDA tensors"):
            mae_kernels.grouped_attention(q, k, v)


def test_dispatch_triton_backend_runs_the_kernels(monkeypatch, kernel_calls):
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "torch")  # the context manager wins over the environment
    q, k, v = make_qkv(1, 2, 6, 6, 2, 16)
    out = triton_attention(q, k, v)
    assert len(kernel_calls) == 1 and "mae_kernels_grouped_attention" in type(out.grad_fn).__name__
    monkeypatch.setenv("MAE_KERNELS_BACKEND", "auto")  # auto: Triton on CUDA tensors or under the interpreter
    mae_kernels.grouped_attention(q, k, v)
    assert len(kernel_calls) == 2


def torch_attention(q, k, v, scale=None):
    with mae_kernels.backend("torch"):
        return mae_kernels.grouped_attention(q, k, v, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("G,Lq,Lk", [(3, 5, 5), (1, 70, 33), (2, 1, 9)])
def test_torch_backend_off_the_cpu_has_a_backward(monkeypatch, dtype, G, Lq, Lk):
    """CUDA tensors under backend("torch") take SDPA's forward and the softmax-recomputing backward (a
    custom op's body runs below autograd: differentiating SDPA there recorded nothing and failed).
    Emulated on CPU by sending CPU tensors down that branch; held to check_against_reference's bounds."""
    monkeypatch.setattr(ga, "_reference_runs", lambda t: False)
    q, k, v = make_qkv(2, G, Lq, Lk, 2, 32, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, dtype)
    got = out_and_grads(torch_attention, q, k, v, g)
    truth = out_and_grads(grouped_attention_reference, *(x.detach().double().requires_grad_() for x in (q, k, v)),
                          g.double())
    same = out_and_grads(grouped_attention_reference, q, k, v, g)  # autograd through SDPA in this dtype
    floor = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.0}[dtype]
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, truth, same):
        assert a.dtype == dtype and a.shape == b.shape
        err = (a.double() - b).abs().max().item()
        bound = max(2 * (c.double() - b).abs().max().item() + torch.finfo(dtype).eps * b.abs().max().item(),
                    floor * max(1.0, b.abs().max().item()))
        assert err <= bound, f"{name}: error {err:.3g} above {bound:.3g}"


@pytest.mark.parametrize("G,Lq,Lk", [(3, 5, 5), (1, 70, 33)])
def test_flop_counter_counts_attention_as_sdpa_math_does(G, Lq, Lk):
    """The custom ops ran unseen by FlopCounterMode (0 FLOPs); now forward + backward count what
    attention written in matmuls counts (SDPA's math path on the same folded tensors)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = make_qkv(2, G, Lq, Lk, 2, 32)
    with FlopCounterMode(display=False) as ours:
        torch_attention(q, k, v).sum().backward()
    with FlopCounterMode(display=False) as maths, sdpa_kernel(SDPBackend.MATH):
        folded = [ga._fold(t.detach()).requires_grad_() for t in (q, k, v)]
        torch.nn.functional.scaled_dot_product_attention(*folded).sum().backward()
    assert ours.get_total_flops() == maths.get_total_flops() == 3 * 4 * 2 * G * 2 * Lq * Lk * 32
