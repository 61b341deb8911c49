"""gather_tokens: keep the tokens an index lists, adding their positional embedding on the way.

    out[b, m, :] = x[b, idx[b, m], :] (+ pos[idx[b, m], :] or pos[b, idx[b, m], :])

This is the MAE encoder's input step (``x_vis = x[~mask].reshape(B, -1, C)`` in MAE/VideoMAE code)
done as one read of the kept rows instead of boolean indexing plus a separate add. The backward pass
is written in gather form: for every source row it sums the output rows that read it (a CSR built
by sorting the index), so it needs no atomics, is deterministic, and accepts repeated indices.
The CSR segment-sum kernel here is shared with ``assemble_decoder_tokens``.

Registered as the custom ops ``mae_kernels::gather_tokens`` and ``mae_kernels::scatter_rows`` (its
backward), so ``torch.compile`` traces through them without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import (
    check_castable,
    check_index,
    check_index_range,
    check_pos,
    check_same_device,
    check_tensor,
    device_guard,
    match_dtype,
    requested_backend,
    runs_triton,
)
from .tiles import row_tile

# --- Triton kernels ---------------------------------------------------------------------------------


@triton.jit
def _gather_fwd_kernel(
    x_ptr, idx_ptr, pos_ptr, out_ptr,
    M, C,
    stride_xb, stride_xn, stride_xc,
    stride_idxb, stride_idxm,
    stride_posb, stride_posn, stride_posc,
    stride_outb, stride_outm, stride_outc,
    HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rm < M
    tile_ok = row_ok[:, None] & (rc < C)[None, :]
    n = tl.load(idx_ptr + b * stride_idxb + rm * stride_idxm, mask=row_ok, other=0).to(tl.int64)
    val = tl.load(x_ptr + b * stride_xb + n[:, None] * stride_xn + rc[None, :] * stride_xc, mask=tile_ok)
    if HAS_POS:
        p = tl.load(pos_ptr + b * stride_posb + n[:, None] * stride_posn + rc[None, :] * stride_posc, mask=tile_ok)
        # add in fp32 and round once, as torch does for half types: bit-equal to the reference
        val = (val.to(tl.float32) + p.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_outb + rm[:, None] * stride_outm + rc[None, :] * stride_outc, val, mask=tile_ok)


@triton.jit
def _segment_rows(g_ptr, perm_ptr, starts_ptr, rn, rc, row_ok, col_ok,
                  stride_gm, stride_gc, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 sum, per source row n, of the gradient rows g[perm[j]] for j in [starts[n], starts[n+1]).

    The pointers are already offset to one batch row.
    """
    start = tl.load(starts_ptr + rn, mask=row_ok, other=0)
    count = tl.load(starts_ptr + rn + 1, mask=row_ok, other=0) - start
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        live = j < count
        m = tl.load(perm_ptr + start + j, mask=live, other=0).to(tl.int64)
        g = tl.load(g_ptr + m[:, None] * stride_gm + rc[None, :] * stride_gc,
                    mask=live[:, None] & col_ok[None, :], other=0.0)
        acc += g.to(tl.float32)
    return acc


@triton.jit
def _segment_sum_kernel(
    g_ptr, perm_ptr, starts_ptr, gx_ptr, gpos_ptr,
    N, C, B,
    stride_gb, stride_gm, stride_gc,
    stride_permb, stride_startsb,
    stride_gxb, stride_gxn, stride_gxc,
    stride_gposb, stride_gposn, stride_gposc,
    WRITE_X: tl.constexpr, WRITE_POS: tl.constexpr, POS_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[b, n] = sum of grad rows whose index is n; grad_pos likewise (summed over b if shared).

    Every element of grad_x / grad_pos is written (zeros where nothing points), so outputs can be
    allocated with torch.empty.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rn < N
    col_ok = rc < C
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if POS_SHARED:
        # pointers advance batch by batch (64-bit pointer arithmetic, no int32 b * stride)
        total = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for _ in range(0, B):
            acc = _segment_rows(g_ptr, perm_ptr, starts_ptr, rn, rc, row_ok, col_ok,
                                stride_gm, stride_gc, BLOCK_N, BLOCK_C)
            if WRITE_X:
                tl.store(gx_ptr + rn[:, None] * stride_gxn + rc[None, :] * stride_gxc,
                         acc.to(gx_ptr.dtype.element_ty), mask=tile_ok)
            total += acc
            g_ptr += stride_gb
            perm_ptr += stride_permb
            starts_ptr += stride_startsb
            gx_ptr += stride_gxb
        if WRITE_POS:
            tl.store(gpos_ptr + rn[:, None] * stride_gposn + rc[None, :] * stride_gposc,
                     total.to(gpos_ptr.dtype.element_ty), mask=tile_ok)
    else:
        b = tl.program_id(2).to(tl.int64)
        acc = _segment_rows(g_ptr + b * stride_gb, perm_ptr + b * stride_permb, starts_ptr + b * stride_startsb,
                            rn, rc, row_ok, col_ok, stride_gm, stride_gc, BLOCK_N, BLOCK_C)
        if WRITE_X:
            tl.store(gx_ptr + b * stride_gxb + rn[:, None] * stride_gxn + rc[None, :] * stride_gxc,
                     acc.to(gx_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_POS:
            tl.store(gpos_ptr + b * stride_gposb + rn[:, None] * stride_gposn + rc[None, :] * stride_gposc,
                     acc.to(gpos_ptr.dtype.element_ty), mask=tile_ok)


# --- launch helpers (shared with assemble_decoder_tokens) -------------------------------------------


def index_csr(idx: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of idx [B, M] as CSR: rows j in [starts[b, n], starts[b, n+1]) of perm[b] point at n."""
    sorted_idx, perm = torch.sort(idx.long().contiguous(), dim=1, stable=True)
    sorted_idx, perm = sorted_idx.contiguous(), perm.contiguous()  # the kernel walks rows with stride 1
    bounds = torch.arange(num_rows + 1, device=idx.device).expand(idx.shape[0], -1).contiguous()
    starts = torch.searchsorted(sorted_idx, bounds)
    return perm, starts


def segment_sum(grad: torch.Tensor, idx: torch.Tensor, num_rows: int, *, want_x: bool, x_dtype: torch.dtype,
                pos_shape: tuple[int, ...] | None, pos_dtype: torch.dtype | None):
    """grad [B, L, C] rows scattered (summed) by idx [B, L] into [B, num_rows, C] and/or pos's shape."""
    B, _, C = grad.shape
    perm, starts = index_csr(idx, num_rows)
    gx = torch.empty((B, num_rows, C), device=grad.device, dtype=x_dtype) if want_x else None
    gpos = torch.empty(pos_shape, device=grad.device, dtype=pos_dtype) if pos_shape is not None else None
    shared = pos_shape is not None and len(pos_shape) == 2
    block_n, block_c = row_tile(num_rows, C, grad.element_size())
    grid = (triton.cdiv(num_rows, block_n), triton.cdiv(C, block_c), 1 if shared else B)
    dummy = grad  # never dereferenced when the matching WRITE_* flag is off
    sx = gx.stride() if gx is not None else (0, 0, 0)
    sq = (0, *gpos.stride()) if shared else (gpos.stride() if gpos is not None else (0, 0, 0))
    _segment_sum_kernel[grid](
        grad, perm, starts, gx if gx is not None else dummy, gpos if gpos is not None else dummy,
        num_rows, C, B,
        *grad.stride(), perm.stride(0), starts.stride(0), *sx, *sq,
        WRITE_X=gx is not None, WRITE_POS=gpos is not None, POS_SHARED=shared,
        BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return gx, gpos


def pos_strides(pos: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of pos as [B, N, C]; a shared [N, C] table gets batch stride 0."""
    if pos is None:
        return (0, 0, 0)
    return (0, *pos.stride()) if pos.dim() == 2 else tuple(pos.stride())


# --- reference --------------------------------------------------------------------------------------


def gather_rows_reference(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, C] or [N, C] (shared), idx [B, M] -> [B, M, C]."""
    idx = idx.long()
    if t.dim() == 2:
        return t[idx]
    # advanced indexing, not torch.gather with an expanded index: ~40x faster on CPU
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    return t[rows, idx]


def gather_tokens_reference(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    out = gather_rows_reference(x, idx)
    if pos is not None:
        out = out + gather_rows_reference(pos, idx)
    return out


def scatter_rows_reference(grad: torch.Tensor, idx: torch.Tensor, num_rows: int, sum_batch: bool) -> torch.Tensor:
    """out[b, n] = sum of grad[b, m] over m with idx[b, m] == n ([N, C] summed over b when sum_batch);
    accumulated in fp32 (fp64 kept), returned in grad's dtype."""
    B, _, C = grad.shape
    acc = torch.promote_types(grad.dtype, torch.float32)
    out = grad.new_zeros((B, num_rows, C), dtype=acc)
    out.scatter_add_(1, idx.long().unsqueeze(-1).expand(-1, -1, C), grad.to(acc))
    return (out.sum(dim=0) if sum_batch else out).to(grad.dtype)


# --- Triton launches --------------------------------------------------------------------------------


def _gather_triton(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    B, _, C = x.shape
    M = idx.shape[1]
    out = torch.empty((B, M, C), device=x.device, dtype=x.dtype)
    block_m, block_c = row_tile(M, C, x.element_size())
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c), B)
    _gather_fwd_kernel[grid](
        x, idx, pos if pos is not None else x, out, M, C,
        *x.stride(), *idx.stride(), *pos_strides(pos), *out.stride(),
        HAS_POS=pos is not None, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


def _scatter_rows_triton(grad: torch.Tensor, idx: torch.Tensor, num_rows: int, sum_batch: bool) -> torch.Tensor:
    C = grad.shape[2]
    gx, gpos = segment_sum(grad, idx, num_rows, want_x=not sum_batch, x_dtype=grad.dtype,
                           pos_shape=(num_rows, C) if sum_batch else None, pos_dtype=grad.dtype)
    return gpos if sum_batch else gx


# --- custom ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mae_kernels::gather_tokens", mutates_args=())
def gather_tokens_op(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x [B, N, C], idx [B, M], pos [N, C] / [B, N, C] / None -> [B, M, C]; arguments already checked."""
    if idx.shape[1] == 0 or x.shape[2] == 0:  # static shapes, not values: nothing to launch
        return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))
    if runs_triton(backend, x):
        with device_guard(x):
            return _gather_triton(x, idx, pos)
    return gather_tokens_reference(x, idx, pos)


@gather_tokens_op.register_fake
def _(x, idx, pos, backend):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("mae_kernels::scatter_rows", mutates_args=())
def scatter_rows_op(grad: torch.Tensor, idx: torch.Tensor, num_rows: int, sum_batch: bool,
                    backend: str) -> torch.Tensor:
    """The backward of a row gather: grad [B, M, C] summed into [B, num_rows, C] (or [num_rows, C]
    when ``sum_batch``) at the rows idx [B, M] names; deterministic (no atomics)."""
    if idx.shape[1] == 0 or grad.shape[2] == 0:  # nothing points anywhere (or no channel): zero gradients
        return grad.new_zeros((num_rows, grad.shape[2]) if sum_batch else (grad.shape[0], num_rows, grad.shape[2]))
    if runs_triton(backend, grad):
        with device_guard(grad):
            return _scatter_rows_triton(grad, idx, num_rows, sum_batch)
    return scatter_rows_reference(grad, idx, num_rows, sum_batch)


@scatter_rows_op.register_fake
def _(grad, idx, num_rows, sum_batch, backend):
    shape = (num_rows, grad.shape[2]) if sum_batch else (grad.shape[0], num_rows, grad.shape[2])
    return grad.new_empty(shape)


def row_gradients(grad: torch.Tensor, idx: torch.Tensor, num_rows: int, want_rows: bool, pos_shape,
                  backend: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a gather by ``idx``: per-sample rows [B, N, C] (if ``want_rows``) and the positional
    table's (shape ``pos_shape``: [N, C] summed over the batch, or [B, N, C]; None when not wanted)."""
    pos_shared = pos_shape is not None and len(pos_shape) == 2
    rows = None
    if want_rows or (pos_shape is not None and not pos_shared):
        rows = scatter_rows_op(grad, idx, num_rows, False, backend)
    if pos_shape is None:
        return rows, None
    pos = scatter_rows_op(grad, idx, num_rows, True, backend) if pos_shared else rows
    return (rows if want_rows else None), pos


def _gather_setup(ctx, inputs, output):
    x, idx, pos, backend = inputs
    ctx.save_for_backward(idx)
    ctx.num_rows = x.shape[1]
    ctx.pos_shape = tuple(pos.shape) if pos is not None else None
    ctx.backend = backend


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    pos_shape = ctx.pos_shape if ctx.needs_input_grad[2] else None
    gx, gpos = row_gradients(grad, idx, ctx.num_rows, ctx.needs_input_grad[0], pos_shape, ctx.backend)
    return gx, None, gpos, None


gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# --- public op --------------------------------------------------------------------------------------


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None,
                  validate: bool = False) -> torch.Tensor:
    """Gather the rows ``idx`` lists from ``x``, adding their positional embedding.

    Args:
        x: [B, N, C] float32/float16/bfloat16 (float64: reference backend only), any strides.
        idx: [B, M] int32 or int64 positions, 0 <= idx < N. Repeats are allowed (their gradients add
            up); M = 0 gives an empty [B, 0, C] and zero gradients. For a boolean mask use
            :func:`mae_kernels.mask_to_indices`.
        pos: optional [N, C] or [1, N, C] (shared by the batch) or [B, N, C], on x's device. Cast to
            x's dtype (the dtype rule of all token ops: under autocast an fp32 table meets half
            activations; its gradient is returned in its own dtype).
        validate: check 0 <= idx < N (reads the index range back to the host: one sync). Off by
            default: out-of-range indices are undefined behaviour, as in any gather kernel.

    Returns:
        [B, M, C] contiguous, dtype of x: ``x[b, idx[b]] + pos[idx[b]]``. Matches the reference bit
        for bit (the add is done in fp32 and rounded once).

    Differentiable in x and pos; the backward pass is a deterministic gather (no atomics).
    Raises ValueError/TypeError naming the argument on bad shapes, dtypes or devices, and on
    out-of-range indices when ``validate``. No host sync unless ``validate``.
    """
    check_tensor("x", x, 3)
    B, N, C = x.shape
    check_same_device(x=x, idx=idx, pos=pos)
    check_index("idx", idx, B, N)  # its range last: validate reads it back to the host
    if pos is not None:
        pos = check_pos("pos", pos, B, N, C)
        check_castable("pos", pos, x, "x")
    name = requested_backend()
    runs_triton(name, x, idx)  # raises here, not inside the op; x decides (pos takes its dtype below)
    if validate:
        check_index_range("idx", idx, N)
    if pos is not None:
        pos = match_dtype("pos", pos, x, "x")
    return gather_tokens_op(x, idx, pos, name)
