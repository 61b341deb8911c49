"""Boolean token masks to the index form the ops take, without a host sync."""

from __future__ import annotations

import torch


def mask_to_indices(mask: torch.Tensor, count: int, validate: bool = False) -> torch.Tensor:
    """Positions of the True entries of a bool mask [B, N] holding ``count`` of them per row: [B, count].

    The positions come out in increasing (raster) order, the order ``x[mask].reshape(B, -1, C)`` gives,
    so ``gather_tokens(x, mask_to_indices(mask, k))`` equals that boolean indexing. A stable argsort
    puts the True entries first: no ``nonzero``, no host sync, a static output shape.

    ``count`` must be the same for every row (MAE-style samplers draw a fixed number per sample;
    VideoMAE: ``int(mask_ratio * N)``). Rows with fewer Trues would silently pick False positions;
    ``validate=True`` checks the counts (one host sync) and raises a ValueError instead.
    For the complementary set use ``mask_to_indices(~mask, N - count)``.

    Raises:
        TypeError: mask not a bool [B, N] tensor, or count not an int (bool included).
        ValueError: count outside [0, N]; with ``validate``, a row holding another number of Trues.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a bool tensor [B, N], got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}")
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)):
        raise TypeError(f"count must be an int (True entries per row), got {type(count).__name__}")
    if isinstance(count, int) and not 0 <= count <= mask.shape[1]:  # symbolic under torch.compile: no guard
        raise ValueError(f"count must be an int in [0, N={mask.shape[1]}] (True entries per row), got {count!r}")
    if validate:
        per_row = mask.sum(dim=1)
        if bool((per_row != count).any()):
            raise ValueError(f"every mask row must hold count={count} True entries, got "
                             f"{sorted(set(per_row.tolist()))}")
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]


def indices_to_mask(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The inverse of :func:`mask_to_indices`: bool [B, num_tokens], True at the positions ``idx`` [B, M] lists.

    One scatter on ``idx``'s device: no host sync, a static shape. Repeated positions are simply True; the
    complement (``~indices_to_mask(idx, N)``) is VideoMAE/HiCMAE's ``bool_masked_pos`` for visible ``idx``.

    Raises:
        TypeError: idx not an int32/int64 [B, M] tensor, or num_tokens not an int (bool included).
        ValueError: num_tokens < 0.
    """
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 2:
        raise TypeError(f"idx must be an int32/int64 tensor [B, M], got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, torch.SymInt)):
        raise TypeError(f"num_tokens must be an int (N, the mask's width), got {type(num_tokens).__name__}")
    if isinstance(num_tokens, int) and num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int (N, the mask's width), got {num_tokens!r}")
    mask = torch.zeros(idx.shape[0], num_tokens, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx.long(), True)
