"""grouped_attention: softmax attention inside each of G independent groups of tokens.

    out[b, g, i, h] = sum_j softmax_j(scale * q[b, g, i, h] . k[b, g, j, h]) v[b, g, j, h]

The LGI-Former runs four tiny attentions per layer (stage I inside each region, II over region
tokens, III local->region, IV region->local); this op serves all four.

Every (b, g, h) triple is an independent attention problem ("a group" below); the kernels number
them flat, (b, g, h) with h fastest, and never copy q/k/v: each row's address comes from the strides,
so slices of one fused qkv projection are read in place.

Two tilings, picked by length:
- packed (Lq, Lk <= 64, e.g. stage I at 11 tokens): one program holds several whole groups, their
  query rows stacked in one BLOCK_M tile and their key rows in one BLOCK_N tile; a block-diagonal
  mask (same slot in the pack) keeps groups apart. A tiny group no longer pads a whole tile, and the
  backward pass needs one kernel: the program owns all of dQ, dK and dV of its groups.
- looped (longer groups, e.g. fine-tuning at 101 tokens): FlashAttention-2 — one group and one query
  block per program, online softmax over key blocks; backward as a dQ kernel (which also writes
  delta = rowsum(dO * O)) followed by a dK/dV kernel looping over query blocks. No atomics anywhere:
  the backward pass is deterministic.
Scores live in log2 units (scale * log2(e) folded into one multiplier, tl.exp2); the forward pass
saves the per-row log-sum-exp so the backward pass recomputes P instead of storing it. Statistics and
accumulators are fp32; fp32 inputs use IEEE dots (no TF32), 16-bit inputs tensor-core dots.
Tile sizes are autotuned on CUDA per (Lq, Lk, head dim, dtype); the interpreter runs one fixed tiling.

Registered as the custom ops ``mae_kernels::grouped_attention`` (output and log-sum-exp) and
``mae_kernels::grouped_attention_backward``, so ``torch.compile`` traces through them. Their CPU
implementation is PyTorch's fused CPU attention (``_scaled_dot_product_flash_attention_for_cpu`` and
its backward), which saves the log-sum-exp the same way, so the reference backward recomputes nothing.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import resources
from .dispatch import (
    check_same_device,
    check_same_dtype,
    check_tensor,
    device_guard,
    interpreter_enabled,
    requested_backend,
    runs_triton,
)

SUPPORTED_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)
LOG2E = 1.4426950408889634
PACK_MAX_LEN = 64  # groups up to this many queries and keys are packed several per tile
MIN_DOT = 16  # smallest tl.dot dimension a GPU accepts (the interpreter would take less)

# --- Triton kernels ---------------------------------------------------------------------------------


@triton.jit
def _groups_per_tile(Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr):
    if PACK:
        return tl.minimum(BLOCK_M // Lq, BLOCK_N // Lk)
    else:
        return 1


@triton.jit
def _tile_rows(pid, L, NG, gpt, start, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """The rows of one tile: (flat group, slot in the pack, position in the group, in bounds).

    Packed: rows r of the tile are position r % L of group pid * gpt + r // L.
    Looped: group pid, positions start + r.
    """
    r = tl.arange(0, BLOCK)
    if PACK:
        slot = r // L
        pos = r - slot * L
        group = pid * gpt + slot
        ok = (slot < gpt) & (group < NG)
    else:
        slot = r * 0
        pos = start + r
        group = slot + pid
        ok = pos < L
    return group, slot, pos, ok


@triton.jit
def _row_offsets(group, pos, G, H, stride_b, stride_g, stride_l, stride_h):
    """Element offset of row (flat group, pos) in a [B, G, L, H, D] tensor with the given strides."""
    group = group.to(tl.int64)
    bg = group // H
    return (bg // G) * stride_b + (bg % G) * stride_g + pos.to(tl.int64) * stride_l + (group % H) * stride_h


@triton.jit
def _load_rows(ptr, group, pos, ok, d, d_ok, G, H, stride_b, stride_g, stride_l, stride_h, stride_d):
    offs = _row_offsets(group, pos, G, H, stride_b, stride_g, stride_l, stride_h)[:, None] + d[None, :] * stride_d
    return tl.load(ptr + offs, mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, val, group, pos, ok, d, d_ok, G, H, stride_b, stride_g, stride_l, stride_h, stride_d):
    offs = _row_offsets(group, pos, G, H, stride_b, stride_g, stride_l, stride_h)[:, None] + d[None, :] * stride_d
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qg, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kg, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vg, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_og, stride_ol, stride_oh, stride_od,
    NG, G, H, Lq, Lk, D, qk_scale,
    PACK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O = softmax(QK^T * scale) V and the log2-sum-exp of every query row (lse_ptr: [NG, Lq])."""
    pid = tl.program_id(0)
    gpt = _groups_per_tile(Lq, Lk, BLOCK_M, BLOCK_N, PACK)
    gq, slot_q, iq, q_ok = _tile_rows(pid, Lq, NG, gpt, tl.program_id(1) * BLOCK_M, BLOCK_M, PACK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(q_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_qb, stride_qg, stride_ql, stride_qh, stride_qd)
    # finite start: tile rows that match no key (pack padding) keep m finite, l = 0 and no NaN
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_end = BLOCK_N if PACK else Lk  # a pack holds all keys of its groups in one tile
    for start_n in range(0, n_end, BLOCK_N):
        gk, slot_k, jk, k_ok = _tile_rows(pid, Lk, NG, gpt, start_n, BLOCK_N, PACK)
        k = _load_rows(k_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_kb, stride_kg, stride_kl, stride_kh, stride_kd)
        v = _load_rows(v_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_vb, stride_vg, stride_vl, stride_vh, stride_vd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where((slot_q[:, None] == slot_k[None, :]) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that matched no key; a NaN sum stays NaN (so does the lse)
    _store_rows(o_ptr, acc / l_i[:, None], gq, iq, q_ok, d, d_ok, G, H,
                stride_ob, stride_og, stride_ol, stride_oh, stride_od)
    tl.store(lse_ptr + gq.to(tl.int64) * Lq + iq, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _attn_bwd_packed_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qg, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kg, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vg, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_og, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dog, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dqg, stride_dql, stride_dqh, stride_dqd,
    stride_dkb, stride_dkg, stride_dkl, stride_dkh, stride_dkd,
    stride_dvb, stride_dvg, stride_dvl, stride_dvh, stride_dvd,
    NG, G, H, Lq, Lk, D, sm_scale, qk_scale,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """All three gradients of the groups of one pack (every query and key of them sits in the tile).

    Its dots contract over the rows of every group of the pack, where a cross-group weight is an exact 0
    but 0 * NaN is NaN: a non-finite input can make other groups of the pack NaN too (never fewer NaN
    than the formula; isolating them cost up to 9 KB of register spills, docs/design-notes.md).
    """
    pid = tl.program_id(0)
    gpt = _groups_per_tile(Lq, Lk, BLOCK_M, BLOCK_N, True)
    gq, slot_q, iq, q_ok = _tile_rows(pid, Lq, NG, gpt, 0, BLOCK_M, True)
    gk, slot_k, jk, k_ok = _tile_rows(pid, Lk, NG, gpt, 0, BLOCK_N, True)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(q_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_qb, stride_qg, stride_ql, stride_qh, stride_qd)
    o = _load_rows(o_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_ob, stride_og, stride_ol, stride_oh, stride_od)
    do = _load_rows(do_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_dob, stride_dog, stride_dol, stride_doh, stride_dod)
    k = _load_rows(k_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_kb, stride_kg, stride_kl, stride_kh, stride_kd)
    v = _load_rows(v_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_vb, stride_vg, stride_vl, stride_vh, stride_vd)
    lse = tl.load(lse_ptr + gq.to(tl.int64) * Lq + iq, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)

    live = (slot_q[:, None] == slot_k[None, :]) & q_ok[:, None] & k_ok[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(tl.where(live, s - lse[:, None], float("-inf")))  # [BLOCK_M, BLOCK_N]
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dq = tl.dot(ds, k, input_precision=DOT_PREC) * sm_scale
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PREC) * sm_scale

    _store_rows(dq_ptr, dq, gq, iq, q_ok, d, d_ok, G, H, stride_dqb, stride_dqg, stride_dql, stride_dqh, stride_dqd)
    _store_rows(dk_ptr, dk, gk, jk, k_ok, d, d_ok, G, H, stride_dkb, stride_dkg, stride_dkl, stride_dkh, stride_dkd)
    _store_rows(dv_ptr, dv, gk, jk, k_ok, d, d_ok, G, H, stride_dvb, stride_dvg, stride_dvl, stride_dvh, stride_dvd)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qg, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kg, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vg, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_og, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dog, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dqg, stride_dql, stride_dqh, stride_dqd,
    NG, G, H, Lq, Lk, D, sm_scale, qk_scale,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one group (looped tiling); also writes delta = rowsum(dO * O)."""
    pid = tl.program_id(0)
    gq, _slot_q, iq, q_ok = _tile_rows(pid, Lq, NG, 1, tl.program_id(1) * BLOCK_M, BLOCK_M, False)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(q_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_qb, stride_qg, stride_ql, stride_qh, stride_qd)
    o = _load_rows(o_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_ob, stride_og, stride_ol, stride_oh, stride_od)
    do = _load_rows(do_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_dob, stride_dog, stride_dol, stride_doh, stride_dod)
    row = gq.to(tl.int64) * Lq + iq
    lse = tl.load(lse_ptr + row, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + row, delta, mask=q_ok)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        gk, _slot_k, jk, k_ok = _tile_rows(pid, Lk, NG, 1, start_n, BLOCK_N, False)
        k = _load_rows(k_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_kb, stride_kg, stride_kl, stride_kh, stride_kd)
        v = _load_rows(v_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_vb, stride_vg, stride_vl, stride_vh, stride_vd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(tl.where(k_ok[None, :], s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PREC)
    _store_rows(dq_ptr, dq * sm_scale, gq, iq, q_ok, d, d_ok, G, H,
                stride_dqb, stride_dqg, stride_dql, stride_dqh, stride_dqd)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qg, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kg, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vg, stride_vl, stride_vh, stride_vd,
    stride_dob, stride_dog, stride_dol, stride_doh, stride_dod,
    stride_dkb, stride_dkg, stride_dkl, stride_dkh, stride_dkd,
    stride_dvb, stride_dvg, stride_dvl, stride_dvh, stride_dvd,
    NG, G, H, Lq, Lk, D, sm_scale, qk_scale,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV of one key block of one group (looped tiling), in transposed form: P^T is [N, M]."""
    pid = tl.program_id(0)
    gk, _slot_k, jk, k_ok = _tile_rows(pid, Lk, NG, 1, tl.program_id(1) * BLOCK_N, BLOCK_N, False)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k = _load_rows(k_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_kb, stride_kg, stride_kl, stride_kh, stride_kd)
    v = _load_rows(v_ptr, gk, jk, k_ok, d, d_ok, G, H, stride_vb, stride_vg, stride_vl, stride_vh, stride_vd)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        gq, _slot_q, iq, q_ok = _tile_rows(pid, Lq, NG, 1, start_m, BLOCK_M, False)
        q = _load_rows(q_ptr, gq, iq, q_ok, d, d_ok, G, H, stride_qb, stride_qg, stride_ql, stride_qh, stride_qd)
        do = _load_rows(do_ptr, gq, iq, q_ok, d, d_ok, G, H,
                        stride_dob, stride_dog, stride_dol, stride_doh, stride_dod)
        row = gq.to(tl.int64) * Lq + iq
        lse = tl.load(lse_ptr + row, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + row, mask=q_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.exp2(tl.where(q_ok[None, :], st - lse[None, :], float("-inf")))  # [BLOCK_N, BLOCK_M]
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=DOT_PREC)
    _store_rows(dk_ptr, dk * sm_scale, gk, jk, k_ok, d, d_ok, G, H,
                stride_dkb, stride_dkg, stride_dkl, stride_dkh, stride_dkd)
    _store_rows(dv_ptr, dv, gk, jk, k_ok, d, d_ok, G, H, stride_dvb, stride_dvg, stride_dvl, stride_dvh, stride_dvd)


# --- tiling ------------------------------------------------------------------------------------------

TILE_SIZES = (16, 32, 64, 128)
# Tiles the interpreter runs (it cannot autotune). Tests override these to cover other tilings.
INTERPRETER_TILES = {"packed": (64, 64), "looped": (32, 32)}


def packs(Lq: int, Lk: int, named_args: dict | None = None) -> bool:
    """Packed tiling (several whole groups per tile, one-kernel backward) for short groups.

    With the launch's ``named_args`` (``q_ptr``, ``BLOCK_D``, ``DOT_PREC``): only when a packed tile that
    holds a group also passes :func:`precision_fits` and, on a measured GPU, is usable for the forward and
    for the packed backward; else the looped kernels, which tile any length. fp32 needs this: at
    BLOCK_D 128 only 16-wide fp32 tiles fit (a 24-token group has no correct packed tile), at BLOCK_D 64
    the 32x32 packed backward spills (a 17-token group), found when every LGI stage shape was checked.
    """
    if Lq > PACK_MAX_LEN or Lk > PACK_MAX_LEN:
        return False
    if named_args is None:
        return True
    return _packs_at(Lq, Lk, named_args["BLOCK_D"], named_args["DOT_PREC"],
                     resources.device_arch(named_args["q_ptr"]))


@functools.cache
def _packs_at(Lq: int, Lk: int, block_d: int, dot_prec: str, arch: str | None) -> bool:
    named = {"BLOCK_D": block_d, "DOT_PREC": dot_prec,  # usable_configs reads the dtype class off q_ptr
             "q_ptr": types.SimpleNamespace(dtype=torch.float32 if dot_prec == "ieee" else torch.bfloat16)}
    fits = [c for c in _PACKED_CONFIGS if precision_fits(c, named)
            and groups_per_tile(Lq, Lk, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 1]
    return all(resources.usable_configs(fits, TUNED_LAUNCHES[name][0].fn.__name__, {**named, "PACK": pack}, arch)
               for name, pack in (("fwd_packed", True), ("bwd_packed", None)))


def groups_per_tile(Lq: int, Lk: int, block_m: int, block_n: int) -> int:
    return min(block_m // Lq, block_n // Lk)


def _packed_tile_fits(block_m: int, block_n: int, Lq: int, Lk: int) -> bool:
    """At least one group fits, and neither side could be halved while holding as many groups."""
    gpt = groups_per_tile(Lq, Lk, block_m, block_n)
    return gpt >= 1 and (block_m == MIN_DOT or block_m // 2 < gpt * Lq) and \
        (block_n == MIN_DOT or block_n // 2 < gpt * Lk)


def _looped_side_fits(block: int, length: int, floor: int) -> bool:
    """A block no longer than the (power-of-2 padded) length, nor needlessly small for long ones."""
    p2 = triton.next_power_of_2(length)
    return min(floor, p2) <= block <= max(MIN_DOT, p2)


def precision_fits(config, named_args) -> bool:
    """fp32 inputs take IEEE dots on the FMA units with every tile in registers: they spill on 128-wide
    tiles at any head dim, on 64-wide ones from BLOCK_D 64, with 2 warps from 16 x 16 x 64
    (tests/helpers/kernel_resources.py measured it; more columns only need more registers). So fp32 keeps
    4+ warps and at most 2048 values per tile row block; other configs are neither measured nor tuned."""
    side = max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    return named_args["DOT_PREC"] != "ieee" or (
        config.num_warps >= 4 and side <= 64 and side * named_args["BLOCK_D"] <= 32 * 64)


def _resource_pruned(kernel: str, configs, named_args, preferred: list, correct: list):
    """The preferred configs that the resource table says are usable on this device (launch, no spills,
    under the register cap, enough occupancy: mae_kernels.resources); else the usable ones of every
    correct config (a smaller tile: fewer groups per pack, more key blocks); else the
    first preferred (only when no correct config is usable, which tests/test_kernel_resources.py rules
    out for every shape, head dim and dtype it checks)."""
    arch = resources.device_arch(named_args["q_ptr"])
    preferred, correct = ([c for c in cs if precision_fits(c, named_args)] for cs in (preferred, correct))
    for candidates in (preferred, correct):
        usable = resources.usable_configs(candidates, kernel, named_args, arch)
        if usable:
            return usable
    return (preferred or correct or configs)[:1]


def _prune_packed(configs, named_args, kernel: str, **kwargs):
    Lq, Lk = named_args["Lq"], named_args["Lk"]
    correct = [c for c in configs if groups_per_tile(Lq, Lk, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 1]
    tight = [c for c in correct if _packed_tile_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], Lq, Lk)]
    return _resource_pruned(kernel, configs, named_args, tight, correct)


def _prune_looped(configs, named_args, kernel: str, **kwargs):
    Lq, Lk = named_args["Lq"], named_args["Lk"]
    tight = [c for c in configs if _looped_side_fits(c.kwargs["BLOCK_M"], Lq, 64)
             and _looped_side_fits(c.kwargs["BLOCK_N"], Lk, 32)]
    return _resource_pruned(kernel, configs, named_args, tight, list(configs))


# Static spaces; the autotuners try only what _resource_table.py measured usable (the plan of
# tests/helpers/kernel_resources.py: every config at BLOCK_D 64, a few at the other head dims):
# packed tiles at most 2:1 (a pack of groups is as wide in queries as in keys; other shapes still find a
# correct tile), 8 warps on a tile of at most 32x32 would leave threads without a row, 2 warps on a
# 64-wide tile spill; looped loops are short at these lengths (a few key blocks), so one pipeline depth.
_PACKED_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1)
    for bm in TILE_SIZES for bn in TILE_SIZES if max(bm, bn) <= 2 * min(bm, bn)
    for w in ((2, 4) if max(bm, bn) <= 32 else (4, 8))
]
_LOOPED_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=8 if max(bm, bn) == 128 else 4, num_stages=2)
    for bm in TILE_SIZES for bn in TILE_SIZES
] + [  # fp32 at BLOCK_D 128 fits only 16-wide tiles, and dQ's spilled 4 B with 4 warps at 101 tokens (sm_90)
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=2)
]
_TUNING_KEY = ["Lq", "Lk", "BLOCK_D", "DOT_PREC"]


# the autotuned launch sites: kernel, and whether it runs packed tiles (several groups per tile)
TUNED_LAUNCHES = {
    "fwd_packed": (_attn_fwd_kernel, True),
    "fwd_looped": (_attn_fwd_kernel, False),
    "bwd_packed": (_attn_bwd_packed_kernel, True),
    "bwd_dq": (_attn_bwd_dq_kernel, False),
    "bwd_dkdv": (_attn_bwd_dkdv_kernel, False),
}


@functools.cache
def tuner(name: str) -> triton.runtime.autotuner.Autotuner:
    """The autotuner of launch site ``name`` (a key of TUNED_LAUNCHES), built at its first launch.

    Not at import: triton 3.3.1's Autotuner asks for the active GPU driver when it is constructed
    (3.6 and 3.9 do not), so on a machine without a GPU ``import mae_kernels`` failed with "0 active
    drivers", reference backend included.
    """
    kernel, packed = TUNED_LAUNCHES[name]
    configs, prune = (_PACKED_CONFIGS, _prune_packed) if packed else (_LOOPED_CONFIGS, _prune_looped)
    prune = functools.partial(prune, kernel=kernel.fn.__name__)
    return triton.autotune(configs=configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


def _launch(name: str, grid_of, *args, **constexprs) -> None:
    """Autotuned launch on CUDA; under the interpreter one fixed tiling (autotune would time them all)."""
    kernel, packed = TUNED_LAUNCHES[name]
    if interpreter_enabled():
        block_m, block_n = INTERPRETER_TILES["packed" if packed else "looped"]
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        kernel[grid_of(meta)](*args, **constexprs, **meta)
    else:
        tuner(name)[grid_of](*args, **constexprs)


def _common(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int, int, dict]:
    B, G, Lq, H, D = q.shape
    # input_precision only acts on fp32 operands (16-bit ones always take tensor-core dots): for them
    # "tf32" changes no arithmetic, it only tells 16-bit launches from fp32 ones in the tuning key
    # (_TUNING_KEY) and precision_fits (whose register limits are for fp32's IEEE dots)
    constexprs = {"BLOCK_D": max(MIN_DOT, triton.next_power_of_2(D)),
                  "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32"}
    return B * G * H, G, H, Lq, k.shape[2], D, constexprs


def _packed_grid(NG: int, Lq: int, Lk: int):
    return lambda meta: (triton.cdiv(NG, groups_per_tile(Lq, Lk, meta["BLOCK_M"], meta["BLOCK_N"])), 1)


def _attention_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    NG, G, H, Lq, Lk, D, constexprs = _common(q, k)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((NG, Lq), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            NG, G, H, Lq, Lk, D, scale * LOG2E)
    if packs(Lq, Lk, {"q_ptr": q, **constexprs}):
        _launch("fwd_packed", _packed_grid(NG, Lq, Lk), *args, PACK=True, **constexprs)
    else:
        grid = lambda meta: (NG, triton.cdiv(Lq, meta["BLOCK_M"]))
        _launch("fwd_looped", grid, *args, PACK=False, **constexprs)
    return out, lse


def _attention_backward(q, k, v, out, lse, grad_out, scale: float):
    NG, G, H, Lq, Lk, D, constexprs = _common(q, k)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride())
    sizes = (NG, G, H, Lq, Lk, D, scale, scale * LOG2E)
    if packs(Lq, Lk, {"q_ptr": q, **constexprs}):  # the forward's choice: same arguments
        _launch("bwd_packed", _packed_grid(NG, Lq, Lk),
                q, k, v, out, grad_out, lse, dq, dk, dv, *strides, *out.stride(), *grad_out.stride(),
                *dq.stride(), *dk.stride(), *dv.stride(), *sizes, **constexprs)
        return dq, dk, dv
    delta = torch.empty_like(lse)
    _launch("bwd_dq", lambda meta: (NG, triton.cdiv(Lq, meta["BLOCK_M"])),
            q, k, v, out, grad_out, lse, delta, dq, *strides, *out.stride(), *grad_out.stride(), *dq.stride(),
            *sizes, **constexprs)
    _launch("bwd_dkdv", lambda meta: (NG, triton.cdiv(Lk, meta["BLOCK_N"])),
            q, k, v, grad_out, lse, delta, dk, dv, *strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *sizes, **constexprs)
    return dq, dk, dv


# --- reference --------------------------------------------------------------------------------------


def _fold(t: torch.Tensor) -> torch.Tensor:
    """[B, G, L, H, D] -> [B*G, H, L, D], the layout of torch's attention ops (a view when it can be)."""
    B, G, L, H, D = t.shape
    return t.reshape(B * G, L, H, D).transpose(1, 2)


def _folded(shape) -> tuple[int, int, int, int]:
    """The shape _fold gives a [B, G, L, H, D] tensor (FLOP formulas get shapes, not tensors)."""
    B, G, L, H, D = shape
    return B * G, H, L, D


def _unfold(t: torch.Tensor, B: int, G: int) -> torch.Tensor:
    """[B*G, H, L, D] -> [B, G, L, H, D]."""
    _, H, L, D = t.shape
    return t.transpose(1, 2).reshape(B, G, L, H, D)


def grouped_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over (B*G, H) sequences; same contract as grouped_attention."""
    B, G = q.shape[:2]
    out = F.scaled_dot_product_attention(_fold(q), _fold(k), _fold(v), dropout_p=dropout_p, scale=scale)
    return _unfold(out, B, G)


def _attention_forward_reference(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash attention: (out [B, G, Lq, H, D] contiguous, natural-log lse [B*G*H, Lq])."""
    B, G = q.shape[:2]
    qf = _fold(q)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, _fold(k), _fold(v), scale=scale)
    # the CPU kernel returns 0 for a query row holding a NaN or an infinity, where the maths (SDPA's math
    # backend, the Triton kernels) give NaN: adding 0 * the row's sum carries it through (NaN * 0 = NaN)
    out = out.add_(qf.sum(-1, keepdim=True), alpha=0.0)
    return _unfold(out, B, G).contiguous(), lse.reshape(-1, q.shape[2])


def _attention_backward_reference(q, k, v, out, lse, grad_out, scale: float):
    B, G, Lq, H, _ = q.shape
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _fold(grad_out), _fold(q), _fold(k), _fold(v), _fold(out), lse.reshape(B * G, H, Lq), 0.0, False,
        scale=scale)
    return tuple(_unfold(t, B, G).contiguous() for t in grads)


def _reference_runs(t: torch.Tensor) -> bool:
    # the fused CPU kernels serve CPU tensors; other devices (CUDA under backend("torch")) run SDPA
    # forward and the softmax-recomputing backward below
    return t.device.type == "cpu"


def _math_backward(q, k, v, out, grad_out, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of softmax(q k^T scale) v in plain tensor ops, recomputing the probabilities.

    A custom op's body runs below autograd, so it cannot differentiate SDPA there (the recorded graph
    is empty); this is the textbook backward, in fp32 (fp64 for fp64), with SDPA's forward output in
    the row term D = rowsum(dO * O). It materialises the [Lq, Lk] scores, like SDPA's math backend.
    """
    B, G = q.shape[:2]
    acc = _lse_dtype(q)
    qf, kf, vf, o, do = (_fold(t).to(acc) for t in (q, k, v, out, grad_out))
    p = torch.softmax(qf @ kf.transpose(-2, -1) * scale, dim=-1)         # [B*G, H, Lq, Lk]
    dv = p.transpose(-2, -1) @ do
    ds = p * (do @ vf.transpose(-2, -1) - (do * o).sum(-1, keepdim=True))
    dq, dk = ds @ kf * scale, ds.transpose(-2, -1) @ qf * scale
    return tuple(_unfold(t, B, G).to(q.dtype).contiguous() for t in (dq, dk, dv))


# --- custom ops -------------------------------------------------------------------------------------


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mae_kernels::grouped_attention", mutates_args=())
def grouped_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, G, Lq, H, D], log-sum-exp [B*G*H, Lq] in the backend's own units) for checked inputs."""
    if runs_triton(backend, q):
        with device_guard(q):
            return _attention_forward(q, k, v, scale)
    if _reference_runs(q):
        return _attention_forward_reference(q, k, v, scale)
    out = grouped_attention_reference(q, k, v, scale).contiguous()
    return out, q.new_zeros((q.shape[0] * q.shape[1] * q.shape[3], q.shape[2]), dtype=_lse_dtype(q))


@grouped_attention_op.register_fake
def _(q, k, v, scale, backend):
    B, G, Lq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B * G * H, Lq),
                                                                                    dtype=_lse_dtype(q))


@torch.library.custom_op("mae_kernels::grouped_attention_backward", mutates_args=())
def grouped_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, scale: float,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, from the forward's output and log-sum-exp."""
    if runs_triton(backend, q):
        with device_guard(q):
            return _attention_backward(q, k, v, out, lse, grad_out, scale)
    if _reference_runs(q):
        return _attention_backward_reference(q, k, v, out, lse, grad_out, scale)
    return _math_backward(q, k, v, out, grad_out, scale)


@grouped_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_backward_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = grouped_attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


grouped_attention_op.register_autograd(_attention_backward_autograd, setup_context=_attention_setup)


def _register_flop_formulas() -> None:
    """FlopCounterMode sees a custom op but not the work in its body: without these, every attention of
    a step counted 0 FLOPs while a peer's explicit matmuls counted in full. Counted as attention written
    in matmuls counts (SDPA's math path): 2 matmuls forward, 4 backward, not the kernels' recomputation
    of the scores, so the algorithmic work compares with such peers."""
    from torch.utils import flop_counter

    def forward_flops(q_shape, k_shape, v_shape) -> int:
        return flop_counter.sdpa_flop_count(_folded(q_shape), _folded(k_shape), _folded(v_shape))

    @flop_counter.register_flop_formula(torch.ops.mae_kernels.grouped_attention)
    def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return forward_flops(q_shape, k_shape, v_shape)

    @flop_counter.register_flop_formula(torch.ops.mae_kernels.grouped_attention_backward)
    def _(grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return 2 * forward_flops(q_shape, k_shape, v_shape)  # dP and dV, then dQ and dK


_register_flop_formulas()


# --- public op --------------------------------------------------------------------------------------


def _check(q, k, v, scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 5)
    check_same_device(q=q, k=k, v=v)
    check_same_dtype(q=q, k=k, v=v)
    B, G, Lq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3], k.shape[4]) != (B, G, H, D):
        raise ValueError(f"k/v must be [B={B}, G={G}, Lk, H={H}, D={D}] to match q, got {tuple(k.shape)}")
    if min(B, G, Lq, H, k.shape[2], D) == 0:
        raise ValueError(f"empty groups: q {tuple(q.shape)}, k {tuple(k.shape)} (every dim must be >= 1)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive number or None, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention within each group.

    Args:
        q: [B, G, Lq, H, D]; k, v: [B, G, Lk, H, D]; one dtype (float32/float16/bfloat16; float64 on
            the reference backend), one device, every dim >= 1. Strided views are accepted and read in
            place, e.g. the slices of one fused qkv projection
            ``linear(x).view(B, G, L, 3, H, D).unbind(3)``; plain (ungrouped) multi-head attention is
            G = 1: ``linear(x).view(B, 1, N, 3, H, D).unbind(3)``, output ``.view(B, N, H * D)``.
        scale: softmax scale, default 1/sqrt(D).
        dropout_p: attention-probability dropout, as in ``F.scaled_dot_product_attention``; pass 0.0
            at eval. The kernels have no dropout, so dropout_p > 0 runs torch's SDPA (an aten op:
            torch.compile sees it, and its backward replays the same dropout mask).

    Head dims in SUPPORTED_HEAD_DIMS run the Triton kernels (tuned for them); any other D runs the
    reference: torch's SDPA on CUDA, its fused CPU kernels on CPU. The choice depends on shapes only.

    Returns:
        [B, G, Lq, H, D], contiguous, in the input dtype (softmax statistics and accumulation in fp32).
        Differentiable in q, k and v (not twice). No host sync. A NaN input makes NaN exactly the
        outputs and gradients the formula makes NaN, on both backends; the Triton kernels' packed
        tiles (Lq, Lk <= 64) may also make the other groups sharing the tile NaN.

    Raises:
        TypeError: an argument of the wrong type, naming it: q, k or v not a float tensor, or not
            one dtype; scale not a float/None or dropout_p not a float (bool included); float64
            under ``backend("triton")``.
        ValueError: a bad shape, device or value, naming the argument: q, k or v not 5-D, k and v
            not alike or not matching q's B, G, H, D, an empty dim, tensors on several devices,
            scale not finite and positive, dropout_p outside [0, 1), the triton backend without
            CUDA or the interpreter.
    """
    _check(q, k, v, scale, dropout_p)
    name = requested_backend()
    runs_triton(name, q, k, v)  # raises here, not inside the op, when the backend cannot run
    if dropout_p > 0.0:
        return grouped_attention_reference(q, k, v, scale, float(dropout_p)).contiguous()
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        name = "torch"
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return grouped_attention_op(q, k, v, scale, name)[0]
