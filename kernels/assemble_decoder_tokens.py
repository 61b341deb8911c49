"""assemble_decoder_tokens: the dual-masked decoder's input in one pass.

    out[b, :Me]  = enc[b] + pos[enc_idx[b]]            (encoder tokens at their own positions)
    out[b, Me:]  = mask_token + pos[dec_idx[b]]        (one mask token per decoder-visible position)

MAE-style code builds this with ``torch.cat`` of the encoder output and an expanded mask token,
then adds a gathered positional table: three full-size temporaries. Here each output row is written
once. Positions may repeat between enc_idx and dec_idx (the decoder mask is drawn independently of
the encoder mask); the positional gradient sums them without atomics through the CSR segment sum
shared with ``gather_tokens``.

Registered as the custom op ``mae_kernels::assemble_decoder_tokens`` (its backward is a slice, a sum
and ``mae_kernels::scatter_rows``), so ``torch.compile`` traces through it.
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
from .gather_tokens import gather_rows_reference, pos_strides, row_gradients
from .tiles import row_tile

# --- Triton kernel ----------------------------------------------------------------------------------


@triton.jit
def _assemble_fwd_kernel(
    enc_ptr, tok_ptr, pos_ptr, eidx_ptr, didx_ptr, out_ptr,
    ME, MD, C,
    stride_encb, stride_encm, stride_encc,
    stride_tokc,
    stride_posb, stride_posn, stride_posc,
    stride_eidxb, stride_eidxm, stride_didxb, stride_didxm,
    stride_outb, stride_outm, stride_outc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = rc < C
    is_enc = rm < ME
    is_dec = (rm >= ME) & (rm < ME + MD)
    n_enc = tl.load(eidx_ptr + b * stride_eidxb + rm * stride_eidxm, mask=is_enc, other=0)
    n_dec = tl.load(didx_ptr + b * stride_didxb + (rm - ME) * stride_didxm, mask=is_dec, other=0)
    n = tl.where(is_enc, n_enc.to(tl.int64), n_dec.to(tl.int64))
    row_ok = is_enc | is_dec
    src = tl.load(enc_ptr + b * stride_encb + rm[:, None] * stride_encm + rc[None, :] * stride_encc,
                  mask=is_enc[:, None] & col_ok[None, :], other=0.0)
    tok = tl.load(tok_ptr + rc * stride_tokc, mask=col_ok, other=0.0)
    src = tl.where(is_enc[:, None], src, tok[None, :])
    p = tl.load(pos_ptr + b * stride_posb + n[:, None] * stride_posn + rc[None, :] * stride_posc,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    val = (src.to(tl.float32) + p.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_outb + rm[:, None] * stride_outm + rc[None, :] * stride_outc, val,
             mask=row_ok[:, None] & col_ok[None, :])


# --- reference --------------------------------------------------------------------------------------


def assemble_decoder_tokens_reference(enc: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
                                      enc_idx: torch.Tensor, dec_idx: torch.Tensor) -> torch.Tensor:
    B, _, C = enc.shape
    visible = enc + gather_rows_reference(pos, enc_idx)
    masked = mask_token.reshape(1, 1, C) + gather_rows_reference(pos, dec_idx)
    return torch.cat([visible, masked], dim=1)


# --- Triton launch ----------------------------------------------------------------------------------


def _assemble_triton(enc, mask_token, pos, enc_idx, dec_idx):
    B, ME, C = enc.shape
    MD = dec_idx.shape[1]
    token = mask_token.reshape(C)
    out = torch.empty((B, ME + MD, C), device=enc.device, dtype=enc.dtype)
    # an empty side is never read (its rows are masked off); hand the launcher a real pointer anyway
    if ME == 0:
        enc, enc_idx = pos, dec_idx
    if MD == 0:
        dec_idx = enc_idx
    block_m, block_c = row_tile(ME + MD, C, enc.element_size())
    grid = (triton.cdiv(ME + MD, block_m), triton.cdiv(C, block_c), B)
    _assemble_fwd_kernel[grid](
        enc, token, pos, enc_idx, dec_idx, out,
        ME, MD, C,
        *(enc.stride() if ME else (0, 0, 0)), token.stride(0), *pos_strides(pos),
        *enc_idx.stride(), *dec_idx.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


# --- custom op --------------------------------------------------------------------------------------


@torch.library.custom_op("mae_kernels::assemble_decoder_tokens", mutates_args=())
def assemble_decoder_tokens_op(enc: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
                               enc_idx: torch.Tensor, dec_idx: torch.Tensor, backend: str) -> torch.Tensor:
    """The checked op: see :func:`assemble_decoder_tokens`."""
    if enc_idx.shape[1] + dec_idx.shape[1] == 0 or enc.shape[2] == 0:  # static shapes: nothing to launch
        return enc.new_empty((enc.shape[0], enc_idx.shape[1] + dec_idx.shape[1], enc.shape[2]))
    if runs_triton(backend, enc):
        with device_guard(enc):
            return _assemble_triton(enc, mask_token, pos, enc_idx, dec_idx)
    return assemble_decoder_tokens_reference(enc, mask_token, pos, enc_idx, dec_idx)


@assemble_decoder_tokens_op.register_fake
def _(enc, mask_token, pos, enc_idx, dec_idx, backend):
    return enc.new_empty((enc.shape[0], enc.shape[1] + dec_idx.shape[1], enc.shape[2]))


def _assemble_setup(ctx, inputs, output):
    enc, mask_token, pos, enc_idx, dec_idx, backend = inputs
    ctx.save_for_backward(enc_idx, dec_idx)
    ctx.meta = (enc.shape[1], pos.shape[-2], tuple(mask_token.shape), tuple(pos.shape), backend)


def _assemble_backward(ctx, grad_out):
    enc_idx, dec_idx = ctx.saved_tensors
    ME, N, token_shape, pos_shape, backend = ctx.meta
    grad_enc = grad_out[:, :ME] if ctx.needs_input_grad[0] else None
    grad_token = None
    if ctx.needs_input_grad[1]:
        # 16-bit gradients are summed in fp32 (many rows add up); float64 stays float64 for gradchecks
        acc = torch.promote_types(grad_out.dtype, torch.float32)
        grad_token = grad_out[:, ME:].sum(dim=(0, 1), dtype=acc).to(grad_out.dtype).reshape(token_shape)
    grad_pos = None
    if ctx.needs_input_grad[2]:
        all_idx = torch.cat([enc_idx.long(), dec_idx.long()], dim=1)
        _, grad_pos = row_gradients(grad_out, all_idx, N, False, pos_shape, backend)
    return grad_enc, grad_token, grad_pos, None, None, None


assemble_decoder_tokens_op.register_autograd(_assemble_backward, setup_context=_assemble_setup)


# --- public op --------------------------------------------------------------------------------------


def assemble_decoder_tokens(enc: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
                            enc_idx: torch.Tensor, dec_idx: torch.Tensor, validate: bool = False) -> torch.Tensor:
    """Build the decoder input ``cat(enc + pos[enc_idx], mask_token + pos[dec_idx])`` in one pass.

    Args:
        enc: [B, Me, C] encoder output (after the encoder-to-decoder projection), any strides.
        mask_token: [C], [1, C] or [1, 1, C], the learned mask token.
        pos: [N, C] or [1, N, C] shared positional table, or [B, N, C].
        enc_idx: [B, Me] int32/int64, the position of each encoder token, in the order the encoder
            emitted them (region-major for the LGI-Former, not raster order). Forward positions, not
            an inverse permutation: with MAE's ``ids_restore`` use ``mae_kernels.integrations.mae``.
        dec_idx: [B, Md] int32/int64, the decoder-visible positions that get a mask token.
            Me or Md may be 0 (mask ratio 0 or 1).
        validate: check that both index tensors lie in [0, N) (one host sync); off by default.

    Returns:
        [B, Me + Md, C] contiguous, dtype of enc; bit-equal to the reference.

    Differentiable in enc, mask_token (gradient summed over its uses) and pos. Positions may appear
    in both index tensors. float32/float16/bfloat16 (float64 on the reference backend); one device.
    ``mask_token`` and ``pos`` are cast to enc's dtype (the dtype rule of all token ops, for autocast:
    their gradients come back in their own dtype). No host sync unless ``validate``.

    Raises:
        TypeError: an argument of the wrong type, naming it: enc, mask_token or pos not a float
            tensor, an index tensor not int32/int64 (a bool mask names
            :func:`mae_kernels.mask_to_indices`), mask_token or pos not float64 next to a float64
            enc; float64 under ``backend("triton")``.
        ValueError: a bad shape or device, naming the argument: enc not 3-D, mask_token not [C],
            [1, C] or [1, 1, C], pos not [N, C], [1, N, C] or [B, N, C], an index tensor not [B, *],
            enc_idx not [B, Me], tensors on several devices, the triton backend without CUDA or the
            interpreter; with ``validate``, indices outside [0, N) (checked last, after every check
            that needs no sync).
    """
    check_tensor("enc", enc, 3)
    B, ME, C = enc.shape
    check_tensor("mask_token", mask_token, (1, 2, 3))
    if tuple(mask_token.shape) not in ((C,), (1, C), (1, 1, C)):
        raise ValueError(f"mask_token must hold C={C} values with shape [{C}], [1, {C}] or [1, 1, {C}], "
                         f"got shape {tuple(mask_token.shape)}")
    check_tensor("pos", pos, (2, 3))
    N = pos.shape[-2]
    check_same_device(enc=enc, mask_token=mask_token, pos=pos, enc_idx=enc_idx, dec_idx=dec_idx)
    pos = check_pos("pos", pos, B, N, C)
    check_castable("pos", pos, enc, "enc")
    check_castable("mask_token", mask_token, enc, "enc")
    check_index("enc_idx", enc_idx, B, N)  # the ranges last: validate reads them back to the host
    if enc_idx.shape[1] != ME:
        raise ValueError(f"enc_idx must list one position per encoder token ({ME}), got shape "
                         f"{tuple(enc_idx.shape)}")
    check_index("dec_idx", dec_idx, B, N)
    name = requested_backend()
    # enc decides: pos and mask_token take its dtype below
    runs_triton(name, enc, enc_idx, dec_idx)  # raises here, not inside the op
    if validate:
        check_index_range("enc_idx", enc_idx, N)
        check_index_range("dec_idx", dec_idx, N)
    pos = match_dtype("pos", pos, enc, "enc")
    mask_token = match_dtype("mask_token", mask_token, enc, "enc")
    return assemble_decoder_tokens_op(enc, mask_token, pos, enc_idx, dec_idx, name)
