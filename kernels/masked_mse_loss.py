"""masked_mse_loss: MAE's reconstruction loss with the target gathered and normalised on the fly.

    target[b, m] = patches[b, idx[b, m]], optionally normalised per patch (per colour channel with
                   norm_groups=3) to zero mean and unit spread
    loss = sum over valid rows of sum_p (pred - target)^2  /  (number of valid rows * P)

The normalisation conventions differ between the public MAE codebases, and each is an option here
(checked against re-implementations of their formulas in tests/test_masked_mse_loss.py and
tests/test_integrations.py):

    MAE (facebookresearch/mae, models_mae.py forward_loss, norm_pix_loss=True): whole patch, unbiased
        variance, eps inside the root: (t - mean) / sqrt(var + 1e-6)
        -> norm_pix=True, unbiased=True, eps_on="var"
    VideoMAE / VideoMAE V2 / HiCMAE (engine_for_pretraining*.py, normalize_target=True): per colour
        channel of a channel-LAST (p c) patch, unbiased std, eps added to the std:
        (t - mean) / (std + 1e-6)
        -> norm_pix=True, norm_groups=3 (1 for audio), channels_last=True, unbiased=True, eps_on="std"
    AVF-MAE++ in this repository: channel-first (c p) patches, biased variance, eps in the root
        -> norm_pix=True, norm_groups=3 (the fused-kernel convention: no extra pass)

``norm_pix`` defaults to off, as in MAE. The Triton kernels normalise inside the loss for the
biased / eps-in-the-root / contiguous-group convention; the others normalise the patches once with
torch ops inside the same custom op (one extra pass over the patches, as the original code spends)
and hand the kernel plain targets.

The MAE way materialises the gathered targets, their normalised copy and the squared error, then
reduces. Here one kernel reads pred and the gathered patch rows once and writes one float per row
(summed by torch, deterministic); the backward kernel recomputes the normalised target from the
patches, so no target tensor is ever stored.

Registered as the custom ops ``mae_kernels::masked_mse_loss`` and ``mae_kernels::masked_mse_loss_backward``,
so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dispatch import (
    check_index,
    check_index_range,
    check_same_device,
    check_tensor,
    device_guard,
    requested_backend,
    runs_triton,
)
from .gather_tokens import gather_rows_reference
from .tiles import group_tile

# --- Triton kernels ---------------------------------------------------------------------------------


@triton.jit
def _normalised_target_error(pred_ptr, patch_ptr, b, rm, n, row_ok, g, PG, eps,
                             stride_predb, stride_predm, stride_predp,
                             stride_patchb, stride_patchn, stride_patchp,
                             NORM_PIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """pred - normalised target for columns of group g, fp32 [BLOCK_M, BLOCK_P], zero off the tile."""
    cols = g * PG + tl.arange(0, BLOCK_P)
    tile_ok = row_ok[:, None] & (tl.arange(0, BLOCK_P) < PG)[None, :]
    t = tl.load(patch_ptr + b * stride_patchb + n[:, None] * stride_patchn + cols[None, :] * stride_patchp,
                mask=tile_ok, other=0.0)
    t = t.to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / PG
        centred = tl.where(tile_ok, t - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / PG
        t = centred * tl.math.rsqrt(var + eps)[:, None]
    p = tl.load(pred_ptr + b * stride_predb + rm[:, None] * stride_predm + cols[None, :] * stride_predp,
                mask=tile_ok, other=0.0)
    return tl.where(tile_ok, p.to(tl.float32) - t, 0.0), cols, tile_ok


@triton.jit
def _masked_mse_fwd_kernel(
    pred_ptr, patch_ptr, idx_ptr, valid_ptr, row_loss_ptr,
    M, PG, eps,
    stride_predb, stride_predm, stride_predp,
    stride_patchb, stride_patchn, stride_patchp,
    stride_idxb, stride_idxm, stride_validb, stride_validm,
    HAS_VALID: tl.constexpr, NORM_PIX: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    n = tl.load(idx_ptr + b * stride_idxb + rm * stride_idxm, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        err, cols, tile_ok = _normalised_target_error(
            pred_ptr, patch_ptr, b, rm, n, row_ok, g, PG, eps, stride_predb, stride_predm, stride_predp,
            stride_patchb, stride_patchn, stride_patchp, NORM_PIX, BLOCK_M, BLOCK_P)
        acc += tl.sum(err * err, axis=1)
    if HAS_VALID:
        keep = tl.load(valid_ptr + b * stride_validb + rm * stride_validm, mask=row_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    tl.store(row_loss_ptr + b * M + rm, acc, mask=row_ok)


@triton.jit
def _masked_mse_bwd_kernel(
    pred_ptr, patch_ptr, idx_ptr, valid_ptr, coef_ptr, grad_ptr,
    M, PG, eps,
    stride_predb, stride_predm, stride_predp,
    stride_patchb, stride_patchn, stride_patchp,
    stride_idxb, stride_idxm, stride_validb, stride_validm,
    stride_gradb, stride_gradm, stride_gradp,
    HAS_VALID: tl.constexpr, NORM_PIX: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_pred = coef * 2 * (pred - target) on valid rows, 0 elsewhere; coef = dL_out / (count * P)."""
    b = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    n = tl.load(idx_ptr + b * stride_idxb + rm * stride_idxm, mask=row_ok, other=0).to(tl.int64)
    coef = tl.load(coef_ptr) * 2.0
    if HAS_VALID:
        keep = tl.load(valid_ptr + b * stride_validb + rm * stride_validm, mask=row_ok, other=0) != 0
    for g in tl.static_range(GROUPS):
        err, cols, tile_ok = _normalised_target_error(
            pred_ptr, patch_ptr, b, rm, n, row_ok, g, PG, eps, stride_predb, stride_predm, stride_predp,
            stride_patchb, stride_patchn, stride_patchp, NORM_PIX, BLOCK_M, BLOCK_P)
        grad = err * coef
        if HAS_VALID:  # select, not multiply by 0: a NaN/inf in an invalid row must not reach its gradient
            grad = tl.where(keep[:, None], grad, 0.0)
        tl.store(grad_ptr + b * stride_gradb + rm[:, None] * stride_gradm + cols[None, :] * stride_gradp,
                 grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)


# --- reference --------------------------------------------------------------------------------------


def _grouped(x: torch.Tensor, norm_groups: int, channels_last: bool) -> torch.Tensor:
    """[..., P] -> [..., G, P/G] in fp32 (fp64 kept): the groups each patch normalises over."""
    *lead, P = x.shape
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if channels_last:
        return x.reshape(*lead, P // norm_groups, norm_groups).transpose(-1, -2)
    return x.reshape(*lead, norm_groups, P // norm_groups)


def _ungrouped(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        x = x.transpose(-1, -2)
    return x.reshape(*x.shape[:-2], -1)


def _group_stats(grouped: torch.Tensor, eps: float, unbiased: bool, eps_on_std: bool):
    """(mean, spread) per group: spread = sqrt(var + eps), or std + eps with ``eps_on_std``."""
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=unbiased, keepdim=True)
    return mean, (var.sqrt() + eps if eps_on_std else torch.sqrt(var + eps))


def normalise_patches(target: torch.Tensor, norm_groups: int = 1, eps: float = 1e-6, unbiased: bool = False,
                      eps_on_std: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Per-patch (per group of P/G values) zero-mean, unit-spread target, in fp32 (fp64 kept).

    Groups are G contiguous blocks of a (c p) patch, or with ``channels_last`` the G interleaved
    channels of a (p c) patch. Spread: sqrt(var + eps), or std + eps with ``eps_on_std``; the
    variance is unbiased (divides by P/G - 1) with ``unbiased``. The one owner of the norm-pix
    formula: avfmae's losses and visualisation use this and :func:`denormalise_patches`.
    """
    t = _grouped(target, norm_groups, channels_last)
    mean, spread = _group_stats(t, eps, unbiased, eps_on_std)
    return _ungrouped((t - mean) / spread, channels_last)


def denormalise_patches(values: torch.Tensor, reference: torch.Tensor, norm_groups: int = 1, eps: float = 1e-6,
                        unbiased: bool = False, eps_on_std: bool = False, channels_last: bool = False) -> torch.Tensor:
    """The inverse of :func:`normalise_patches` with ``reference``'s statistics: ``values`` (normalised
    space, e.g. norm-pix predictions) mapped back as ``values * spread + mean`` of the matching
    ``reference`` patches (same shape), in fp32 (fp64 kept). The MAE visualisation convention."""
    ref = _grouped(reference, norm_groups, channels_last)
    mean, spread = _group_stats(ref, eps, unbiased, eps_on_std)
    return _ungrouped(_grouped(values, norm_groups, channels_last) * spread + mean, channels_last)


def _target(patches, idx, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last):
    target = gather_rows_reference(patches.detach(), idx)
    if norm_pix:
        target = normalise_patches(target, norm_groups, eps, unbiased, eps_on_std, channels_last)
    return target


def masked_mse_loss_reference(pred, patches, idx, valid=None, norm_pix=False, eps=1e-6, norm_groups=1,
                              unbiased=False, eps_on_std=False, channels_last=False):
    target = _target(patches, idx, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last)
    compute = torch.promote_types(pred.dtype, torch.float32)
    row_err = (pred.to(compute) - target.to(compute)).pow(2).sum(dim=-1)  # [B, M]
    B, M, P = pred.shape
    if valid is not None:  # select, not multiply: NaN * 0 is NaN, and invalid rows must not count at all
        row_err = torch.where(valid, row_err, 0.0)
    return row_err.sum() / (_valid_count(valid, B, M, pred).to(compute) * P)


def _valid_count(valid: torch.Tensor | None, B: int, M: int, like: torch.Tensor) -> torch.Tensor:
    """Rows that count (at least 1, so an all-invalid batch gives loss 0, not NaN), a device scalar."""
    if valid is None:
        return torch.full((), float(max(B * M, 1)), device=like.device, dtype=torch.float32)
    return valid.sum(dtype=torch.float32).clamp(min=1)


def masked_mse_loss_backward_reference(grad_loss, pred, patches, idx, valid, norm_pix, eps, norm_groups,
                                       unbiased=False, eps_on_std=False, channels_last=False):
    target = _target(patches, idx, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last)
    compute = torch.promote_types(pred.dtype, torch.float32)
    B, M, P = pred.shape
    coef = 2.0 * grad_loss.to(compute) / (_valid_count(valid, B, M, pred).to(compute) * P)
    grad = (pred.to(compute) - target.to(compute)) * coef
    if valid is not None:  # select, as the forward: an invalid row's gradient is exactly 0, even over NaN/inf
        grad = torch.where(valid.unsqueeze(-1), grad, 0.0)
    return grad.to(pred.dtype)


def _kernel_targets(patches, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last):
    """(patches, NORM_PIX) for the kernels: they normalise in-kernel for the biased / eps-in-the-root /
    contiguous-group convention; any other convention is normalised here, once, over all patches."""
    native = not (unbiased or eps_on_std or (channels_last and norm_groups > 1))
    if not norm_pix or native:
        return patches, norm_pix
    return normalise_patches(patches, norm_groups, eps, unbiased, eps_on_std, channels_last), False


# --- Triton launches --------------------------------------------------------------------------------


def _loss_triton(pred, patches, idx, valid, norm_pix, eps, norm_groups):
    B, M, P = pred.shape
    group_size = P // norm_groups
    valid_u8 = valid.to(torch.uint8) if valid is not None else None
    row_loss = torch.empty((B, M), device=pred.device, dtype=torch.float32)
    block_m, block_p = group_tile(M, group_size)
    grid = (triton.cdiv(M, block_m), B)
    _masked_mse_fwd_kernel[grid](
        pred, patches, idx, valid_u8 if valid_u8 is not None else idx, row_loss,
        M, group_size, eps,
        *pred.stride(), *patches.stride(), *idx.stride(),
        *(valid_u8.stride() if valid_u8 is not None else (0, 0)),
        HAS_VALID=valid_u8 is not None, NORM_PIX=norm_pix, GROUPS=norm_groups,
        BLOCK_M=block_m, BLOCK_P=block_p,
    )
    return row_loss.sum() / (_valid_count(valid, B, M, pred) * P)


def _loss_backward_triton(grad_loss, pred, patches, idx, valid, norm_pix, eps, norm_groups):
    B, M, P = pred.shape
    group_size = P // norm_groups
    valid_u8 = valid.to(torch.uint8) if valid is not None else None
    coef = (grad_loss.float() / (_valid_count(valid, B, M, pred) * P)).reshape(1).contiguous()
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format)
    block_m, block_p = group_tile(M, group_size)
    grid = (triton.cdiv(M, block_m), B)
    _masked_mse_bwd_kernel[grid](
        pred, patches, idx, valid_u8 if valid_u8 is not None else idx, coef, grad,
        M, group_size, eps,
        *pred.stride(), *patches.stride(), *idx.stride(),
        *(valid_u8.stride() if valid_u8 is not None else (0, 0)), *grad.stride(),
        HAS_VALID=valid_u8 is not None, NORM_PIX=norm_pix, GROUPS=norm_groups,
        BLOCK_M=block_m, BLOCK_P=block_p,
    )
    return grad


# --- custom ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mae_kernels::masked_mse_loss", mutates_args=())
def masked_mse_loss_op(pred: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None,
                       norm_pix: bool, eps: float, norm_groups: int, unbiased: bool, eps_on_std: bool,
                       channels_last: bool, backend: str) -> torch.Tensor:
    """The checked op: see :func:`masked_mse_loss`."""
    convention = (norm_groups, unbiased, eps_on_std, channels_last)
    if idx.shape[1] == 0:  # static shape: no row to reconstruct, loss 0 (as with no valid row)
        return pred.new_zeros((), dtype=torch.promote_types(pred.dtype, torch.float32))
    if runs_triton(backend, pred, patches):
        with device_guard(pred):
            patches, norm_pix = _kernel_targets(patches, norm_pix, eps, *convention)
            return _loss_triton(pred, patches, idx, valid, norm_pix, eps, norm_groups)
    return masked_mse_loss_reference(pred, patches, idx, valid, norm_pix, eps, *convention)


@masked_mse_loss_op.register_fake
def _(pred, patches, idx, valid, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last, backend):
    return pred.new_empty((), dtype=torch.promote_types(pred.dtype, torch.float32))


@torch.library.custom_op("mae_kernels::masked_mse_loss_backward", mutates_args=())
def masked_mse_loss_backward_op(grad_loss: torch.Tensor, pred: torch.Tensor, patches: torch.Tensor,
                                idx: torch.Tensor, valid: torch.Tensor | None, norm_pix: bool, eps: float,
                                norm_groups: int, unbiased: bool, eps_on_std: bool, channels_last: bool,
                                backend: str) -> torch.Tensor:
    """d loss / d pred, recomputing the normalised targets from the patches."""
    convention = (norm_groups, unbiased, eps_on_std, channels_last)
    if idx.shape[1] == 0:
        return torch.zeros_like(pred, memory_format=torch.contiguous_format)
    if runs_triton(backend, pred, patches):
        with device_guard(pred):
            patches, norm_pix = _kernel_targets(patches, norm_pix, eps, *convention)
            return _loss_backward_triton(grad_loss, pred, patches, idx, valid, norm_pix, eps, norm_groups)
    return masked_mse_loss_backward_reference(grad_loss, pred, patches, idx, valid, norm_pix, eps, *convention)


@masked_mse_loss_backward_op.register_fake
def _(grad_loss, pred, patches, idx, valid, norm_pix, eps, norm_groups, unbiased, eps_on_std, channels_last,
      backend):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    pred, patches, idx, valid, *options = inputs
    ctx.save_for_backward(pred, patches, idx, valid)
    ctx.options = options


def _loss_backward(ctx, grad_loss):
    pred, patches, idx, valid = ctx.saved_tensors
    grad = masked_mse_loss_backward_op(grad_loss, pred, patches.detach(), idx, valid, *ctx.options)
    return (grad, *([None] * (3 + len(ctx.options))))


masked_mse_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# --- public op --------------------------------------------------------------------------------------

EPS_ON = ("var", "std")


def masked_mse_loss(pred: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
                    valid: torch.Tensor | None = None, norm_pix: bool = False, eps: float = 1e-6,
                    norm_groups: int = 1, validate: bool = False, *, unbiased: bool = False,
                    eps_on: str = "var", channels_last: bool = False) -> torch.Tensor:
    """Mean squared error between predictions and the (optionally normalised) patches they reconstruct.

    Args:
        pred: [B, M, P] predictions, float32/float16/bfloat16 (float64: reference backend), any strides.
        patches: [B, N, P] patchified targets, any float dtype (not differentiated: targets are
            data). Compared in pred's compute dtype (fp32; fp64 for float64 pred): float64 patches
            next to a float32/16-bit pred are cast to float32 first, so both backends take them.
        idx: [B, M] int32/int64, the patch each prediction row reconstructs, 0 <= idx < N. M = 0
            gives loss 0 and an empty gradient. A boolean mask converts with
            :func:`mae_kernels.mask_to_indices`.
        valid: optional [B, M] bool; rows where it is False do not count (dual masking: decoder
            rows that the encoder saw; MAE's ``mask`` when pred covers every patch). The mean runs
            over the valid rows only; with no valid row the loss is 0 (not NaN), so one empty batch
            cannot poison training. An invalid row is ignored even when its pred or patch holds
            NaN/inf: it adds nothing to the loss and its gradient is exactly 0 (a NaN in a valid row
            makes the loss NaN).
        norm_pix: normalise each target patch to zero mean / unit spread. Off by default, as in MAE.
        eps: the stabiliser of the spread (see ``eps_on``).
        norm_groups: normalise P/G values at a time (3: per colour channel); P must divide by it.
        validate: check 0 <= idx < N (one host sync); off by default.
        unbiased: divide the variance by (P/G - 1) as ``torch.var``'s default (MAE, VideoMAE), not P/G.
        eps_on: "var" for (t - mean) / sqrt(var + eps) (MAE), "std" for (t - mean) / (std + eps)
            (VideoMAE, HiCMAE).
        channels_last: the patch is flattened (p c), channels interleaved (VideoMAE, HiCMAE; also
            MAE's patchify), so a group is every G-th value; default (c p), G contiguous blocks.
            Only matters when norm_groups > 1.

    The recipe of each public codebase is spelled out in this module's docstring and applied by
    :mod:`mae_kernels.integrations`.

    Returns:
        A float32 scalar (float64 for float64 pred). Differentiable in pred only. No host sync unless
        ``validate``.

    Raises:
        TypeError: an argument of the wrong type, naming it: pred/patches not float tensors, idx not
            int32/int64 (a bool mask names :func:`mae_kernels.mask_to_indices`), valid not a bool
            tensor, norm_groups not an int (bool included), eps not a number, eps_on not a str;
            float64 pred under ``backend("triton")``.
        ValueError: a bad shape, device or value, naming the argument: pred/patches not 3-D or not
            [B, *, P] alike, P = 0, idx/valid not [B, M], tensors on several devices, norm_groups < 1
            or not dividing P, eps not finite and positive, eps_on not 'var'/'std', unbiased with
            fewer than 2 values per group, the triton backend without CUDA or the interpreter; with
            ``validate``, idx outside [0, N) (checked last, after every check that needs no sync).
    """
    check_tensor("pred", pred, 3)
    check_tensor("patches", patches, 3)
    B, M, P = pred.shape
    if P == 0:  # the per-row mean over no values is 0/0: refuse it rather than return NaN or 0
        raise ValueError(f"pred and patches need at least one value per patch (P >= 1), got pred {tuple(pred.shape)}")
    if patches.shape[0] != B or patches.shape[2] != P:
        raise ValueError(f"patches must be [B={B}, N, P={P}] to match pred, got {tuple(patches.shape)}")
    check_same_device(pred=pred, patches=patches, idx=idx, valid=valid)
    check_index("idx", idx, B, patches.shape[1])  # its range last: validate reads it back to the host
    if idx.shape[1] != M:
        raise ValueError(f"idx must have one entry per prediction row ({M}), got shape {tuple(idx.shape)}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
        if tuple(valid.shape) != (B, M):
            raise ValueError(f"valid must have shape [{B}, {M}], got {tuple(valid.shape)}")
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int):
        raise TypeError(f"norm_groups must be an int, got {type(norm_groups).__name__}")
    if norm_groups < 1 or P % norm_groups:
        raise ValueError(f"norm_groups must be a positive integer dividing P={P}, got {norm_groups!r}")
    # a Python number: a tensor eps would be read back to the host by the comparison and by float()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite positive number, got {eps}")
    if not isinstance(eps_on, str):
        raise TypeError(f"eps_on must be a str ('var' or 'std'), got {type(eps_on).__name__}")
    if eps_on not in EPS_ON:
        raise ValueError(f"eps_on must be 'var' ((t - mean) / sqrt(var + eps), MAE) or 'std' "
                         f"((t - mean) / (std + eps), VideoMAE/HiCMAE), got {eps_on!r}")
    if norm_pix and unbiased and P // norm_groups < 2:
        raise ValueError(f"unbiased normalisation needs at least 2 values per group, got P/norm_groups = "
                         f"{P // norm_groups}")
    name = requested_backend()
    # patches do not decide: float64 ones are cast below unless pred, which decides, is float64 too
    runs_triton(name, pred, idx, valid)  # raises here, not inside the op, when the backend cannot run
    if validate:
        check_index_range("idx", idx, patches.shape[1])
    compute = torch.promote_types(pred.dtype, torch.float32)
    if patches.dtype == torch.float64 and compute != torch.float64:
        # the targets are compared in pred's compute dtype anyway; cast once here so both backends take
        # float64 patches and agree (the kernels do not read float64)
        patches = patches.to(compute)
    return masked_mse_loss_op(pred, patches, idx, valid, bool(norm_pix), float(eps), norm_groups, bool(unbiased),
                              eps_on == "std", bool(channels_last), name)
