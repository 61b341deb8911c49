"""grouped_attention against the peer attention paths, at the LGI-Former's four stage shapes.

One group per (stage, size, pass); the ratio of medians inside a group is the speedup.

==============  ==============================================================================  ====
case            what runs                                                                       role
==============  ==============================================================================  ====
mae_kernels     mae_kernels.grouped_attention on the strided q/k/v views                        ours
sdpa-<backend>  F.scaled_dot_product_attention on (b g) h l d views, under sdpa_kernel(backend)  peer
flex            FlexAttention (compiled): a sample's G groups as one sequence, block-diagonal    peer
                BlockMask (no mask when G = 1); CUDA only
xformers        memory_efficient_attention over all tokens with a BlockDiagonalMask              peer
flash-attn      flash_attn_varlen_func, one variable-length sequence per group                   peer
==============  ==============================================================================  ====

Every case starts from the same fused projections (self-attention: qkv [B, G, L, 3, H, D]; cross
attention: q [B, G, Lq, H, D] and kv [B, G, Lk, 2, H, D]) and ends with [B, G, Lq, H*D], what the
output projection reads — so a path whose output layout needs a copy pays for it. Forward+backward
returns the gradients of those projections. Before timing, each peer's output is checked against the
reference, so every ratio compares the same computation. Peers that are not installed, not on this
device, or cannot run the shape are skipped with the reason.

Shapes (DESIGN): stage I is attention inside each of K=8 regions of Z'+1 tokens (pre-training video 11,
audio 4; fine-tuning video 101), II over the 8 region tokens, III the 80 local video tokens to the 8
region tokens, IV the reverse. Sizes: base H=8, huge H=12, both D=64. CUDA: batch 32, bf16. CPU: batch
1, fp32, and mae_kernels runs its torch reference (the Triton interpreter is never timed), so CPU
ratios only check the harness.

extra_info: role, TFLOP/s (4·B·G·H·Lq·Lk·D forward; forward+backward 3.5x that: the backward pass
is 2.5x the forward, FlashAttention's convention) and GB/s (forward reads q, k, v and writes out;
backward also reads q, k, v, out, dout and writes dq, dk, dv).
"""

from __future__ import annotations

import warnings

import mae_kernels
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from mae_kernels.grouped_attention import grouped_attention_reference
from torch.nn.attention import SDPBackend, sdpa_kernel

from avfmae.config import get_config
from avfmae.lgi_former import attention_shapes
from benchmarks.conftest import CUDA, DEVICE, run_timed

pytestmark = pytest.mark.kernels

BATCH = 32 if CUDA else 1
DTYPE = torch.bfloat16 if CUDA else torch.float32
KERNELS = "auto" if CUDA else "torch"  # never the Triton interpreter, even when TRITON_INTERPRET=1
# name: (G, Lq, Lk), the model's own stage shapes; a subset keeps the GPU run's kernel stage short
STAGES = {name: attention_shapes(get_config("base"))[name] for name in (
    "I-video-pretrain", "I-audio-pretrain", "II-video", "III-video-pretrain", "IV-video-pretrain",
    "I-video-finetune")}
SIZES = {"base": (8, 64), "huge": (12, 64)}  # (H, D): C = 512 and 768
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
IMPLS = ["mae_kernels", *(f"sdpa-{name}" for name in SDPA_BACKENDS), "flex", "xformers", "flash-attn"]

try:  # a broken install (ABI mismatch) must skip its cases, not break the suite
    from xformers.ops import fmha as xformers_fmha
except Exception as exc:
    xformers_fmha, XFORMERS_MISSING = None, f"xformers not importable: {exc}"
try:
    from flash_attn import flash_attn_varlen_func
except Exception as exc:
    flash_attn_varlen_func, FLASH_ATTN_MISSING = None, f"flash-attn not importable: {exc}"


# --- the contenders: (q, k, v) as [B, G, L, H, D] views -> [B, G, Lq, H*D] ----------------------------


def mae_kernels_attention(q, k, v):
    with mae_kernels.backend(KERNELS):
        out = mae_kernels.grouped_attention(q, k, v)
    return rearrange(out, "b g l h d -> b g l (h d)")


def sdpa_attention(backend):
    def attention(q, k, v):
        fold = "b g l h d -> (b g) h l d"
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(rearrange(q, fold), rearrange(k, fold), rearrange(v, fold))
        return rearrange(out, "(b g) h l d -> b g l (h d)", g=q.shape[1])
    return attention


_compiled_flex = None


def flex_attention(G, Lq, Lk):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if _compiled_flex is None:
        # one compiled graph per (shape, pass): 24 here, past dynamo's default limit of 8 recompiles,
        # after which it would silently fall back to the slow eager flex_attention
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex, dynamic=False)
    # query i and key j meet only inside one group: same index of group in the (g l) sequence
    mask = None if G == 1 else create_block_mask(lambda b, h, i, j: i // Lq == j // Lk, None, None,
                                                 G * Lq, G * Lk, device=DEVICE)

    def attention(q, k, v):
        fold = "b g l h d -> b h (g l) d"
        out = _compiled_flex(rearrange(q, fold), rearrange(k, fold), rearrange(v, fold), block_mask=mask)
        return rearrange(out, "b h (g l) d -> b g l (h d)", g=G)
    return attention


def xformers_attention(B, G, Lq, Lk):
    mask, lengths = xformers_fmha.attn_bias.BlockDiagonalMask, ([Lq] * (B * G), [Lk] * (B * G))
    try:  # xformers >= 0.0.28 keeps the sequence starts on the device instead of copying them per call
        bias = mask.from_seqlens(*lengths, device=DEVICE)
    except TypeError:
        bias = mask.from_seqlens(*lengths)

    def attention(q, k, v):
        flat = "b g l h d -> 1 (b g l) h d"
        out = xformers_fmha.memory_efficient_attention(rearrange(q, flat), rearrange(k, flat), rearrange(v, flat),
                                                       attn_bias=bias)
        return rearrange(out, "1 (b g l) h d -> b g l (h d)", b=B, g=G)
    return attention


def flash_attn_attention(B, G, Lq, Lk):
    cu_q = torch.arange(0, B * G + 1, device=DEVICE, dtype=torch.int32) * Lq
    cu_k = torch.arange(0, B * G + 1, device=DEVICE, dtype=torch.int32) * Lk

    def attention(q, k, v):
        flat = "b g l h d -> (b g l) h d"
        out = flash_attn_varlen_func(rearrange(q, flat), rearrange(k, flat), rearrange(v, flat),
                                     cu_q, cu_k, Lq, Lk)
        return rearrange(out, "(b g l) h d -> b g l (h d)", b=B, g=G)
    return attention


def contender(impl, B, G, Lq, Lk):
    """The attention function of a case, or pytest.skip with the reason it cannot run here."""
    if impl == "mae_kernels":
        return mae_kernels_attention
    if impl.startswith("sdpa-"):
        return sdpa_attention(SDPA_BACKENDS[impl.removeprefix("sdpa-")])
    if impl == "flex":
        if not CUDA:
            pytest.skip("FlexAttention is benchmarked on CUDA only (no backward on CPU; compiling it there "
                        "takes ~30 s a shape)")
        return flex_attention(G, Lq, Lk)
    if impl == "xformers":
        if xformers_fmha is None or not CUDA:
            pytest.skip(XFORMERS_MISSING if xformers_fmha is None else "xformers needs CUDA")
        return xformers_attention(B, G, Lq, Lk)
    if flash_attn_varlen_func is None or not CUDA:
        pytest.skip(FLASH_ATTN_MISSING if flash_attn_varlen_func is None else "flash-attn needs CUDA")
    return flash_attn_attention(B, G, Lq, Lk)


# --- inputs, checks, bookkeeping ---------------------------------------------------------------------


def projections(B, G, Lq, Lk, H, D, requires_grad):
    """The fused projection outputs every case starts from, and how to cut q, k, v out of them."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE).requires_grad_(requires_grad)

    if Lq == Lk:
        return (randn(B, G, Lq, 3, H, D),), lambda qkv: qkv.unbind(3)
    return (randn(B, G, Lq, H, D), randn(B, G, Lk, 2, H, D)), lambda q, kv: (q, *kv.unbind(3))


def probe(attention, leaves, split, grad_out, name):
    """Run a case once (compiles/autotunes too); skip it with the reason when it cannot run the shape
    (forward, or backward when grad_out is given), fail when its output is not grouped attention."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = attention(*split(*leaves))
            if grad_out is not None:
                torch.autograd.grad(out, leaves, grad_out)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            why = [str(w.message).splitlines()[0] for w in caught] + [str(exc).splitlines()[0]]
            pytest.skip(f"{name} cannot run this shape on {DEVICE}: {' | '.join(why)}")
    q, k, v = (t.detach().float() for t in split(*leaves))
    want = rearrange(grouped_attention_reference(q, k, v), "b g l h d -> b g l (h d)")
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{name} output: {m}")


def cost(B, G, Lq, Lk, H, D, backward):
    """(FLOPs, bytes moved) of one call; see the module docstring."""
    flops = 4 * B * G * H * Lq * Lk * D * (3.5 if backward else 1.0)
    q_size, kv_size = B * G * Lq * H * D, B * G * Lk * H * D
    elements = 2 * q_size + 2 * kv_size + ((4 * q_size + 4 * kv_size) if backward else 0)
    return flops, elements * torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_grouped_attention(benchmark, stage, size, impl, backward):
    (G, Lq, Lk), (H, D) = STAGES[stage], SIZES[size]
    benchmark.group = (f"grouped_attention {stage} G={G} Lq={Lq} Lk={Lk} {size} H={H} D={D} "
                       f"{'fwd+bwd' if backward else 'fwd'}")
    benchmark.extra_info["role"] = "ours" if impl == "mae_kernels" else "peer"
    attention = contender(impl, BATCH, G, Lq, Lk)
    leaves, split = projections(BATCH, G, Lq, Lk, H, D, requires_grad=backward)
    grad_out = torch.randn(BATCH, G, Lq, H * D, device=DEVICE, dtype=DTYPE) if backward else None
    probe(attention, leaves, split, grad_out, impl)

    def fn():
        out = attention(*split(*leaves))
        return torch.autograd.grad(out, leaves, grad_out) if backward else out

    flops, bytes_moved = cost(BATCH, G, Lq, Lk, H, D, backward)
    run_timed(benchmark, fn, flops=flops, bytes_moved=bytes_moved)
