"""facebookresearch/mae (``models_mae.py``) conventions, mapped onto the ops.

MAE shuffles each sample's L patch tokens with ``ids_shuffle = argsort(noise)``, keeps the first
``len_keep``, and unshuffles the decoder input with the inverse permutation
``ids_restore = argsort(ids_shuffle)``; ``mask`` [B, L] is 1.0 on removed patches. Its positional
tables are ``[1, 1 + L, C]`` with the cls token's entry first.

The ops take *forward* positions (which patch each row holds, i.e. ``ids_shuffle``); MAE's code
carries ``ids_restore``. These helpers take each by its MAE name and convert, so the two cannot be
swapped by mistake.

The decoder input is built in shuffle order ``[cls, kept..., masked...]`` in one pass instead of
``cat`` + unshuffling ``gather`` + positional add. MAE's decoder is plain self-attention, equivariant
to the order of its tokens, so its predictions are the same rows in another order; :func:`unshuffle`
puts them back in raster order, where :func:`loss` and MAE's callers expect them.
"""

from __future__ import annotations

import torch

from ..assemble_decoder_tokens import assemble_decoder_tokens
from ..gather_tokens import gather_tokens
from ..masked_mse_loss import masked_mse_loss


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, p*p*3], patches raster-ordered and flattened (p q c), as MAE's patchify."""
    B, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be a multiple of patch_size={p}")
    x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def encoder_tokens(x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor, ids_shuffle: torch.Tensor,
                   len_keep: int) -> torch.Tensor:
    """The encoder input of ``forward_encoder``: [B, 1 + len_keep, C].

    x: [B, L, C] patch embeddings; pos_embed: [1, 1 + L, C] (cls entry first); cls_token: [1, 1, C];
    ids_shuffle: [B, L] as ``random_masking`` draws it. Rows: cls + pos[0], then
    ``x[ids_keep] + pos[1 + ids_keep]`` (positions added while gathering, one pass).
    """
    kept = gather_tokens(x, ids_shuffle[:, :len_keep], pos_embed[:, 1:])
    cls = (cls_token + pos_embed[:, :1]).to(kept.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([cls, kept], dim=1)


def shuffle_of(ids_restore: torch.Tensor) -> torch.Tensor:
    """``ids_shuffle`` from ``ids_restore`` (the inverse permutation, by a scatter: no sort, no sync)."""
    rows = torch.arange(ids_restore.shape[1], device=ids_restore.device).expand_as(ids_restore)
    return torch.empty_like(ids_restore).scatter_(1, ids_restore, rows)


def random_masking(x: torch.Tensor, mask_ratio: float, pos_embed: torch.Tensor, cls_token: torch.Tensor,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward_encoder`` from the positional add to the cls token, in one call.

    x: [B, L, C] patch embeddings. Draws the noise as MAE does (``torch.rand(B, L)`` on x's device: the
    same random stream, hence the same masks under the same seed) unless ``noise`` is given. Returns
    (encoder input [B, 1 + len_keep, C], mask [B, L] float with 1 = removed, ids_restore [B, L]) --
    what MAE's lines returned, with the cls token already in front.
    """
    B, L, _ = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).float()
    return encoder_tokens(x, pos_embed, cls_token, ids_shuffle, len_keep), mask, ids_restore


def decoder_tokens(x: torch.Tensor, mask_token: torch.Tensor, decoder_pos_embed: torch.Tensor,
                   ids_restore: torch.Tensor) -> torch.Tensor:
    """The decoder input of ``forward_decoder`` (after ``decoder_embed``), in shuffle order: [B, 1 + L, C].

    x: [B, 1 + len_keep, C] (cls first); mask_token: [1, 1, C]; decoder_pos_embed: [1, 1 + L, C];
    ids_restore: [B, L] as MAE returns it. Row 0 is cls + pos[0]; then the kept tokens at their
    positions; then one mask token per masked position. One pass: the cls token is position 0 of the
    table. Run the decoder, then :func:`unshuffle` its predictions.
    """
    B, T, _ = x.shape
    shifted = shuffle_of(ids_restore) + 1  # table row of each patch (row 0 is the cls token's)
    enc_idx = torch.cat([shifted.new_zeros(B, 1), shifted[:, :T - 1]], dim=1)
    return assemble_decoder_tokens(x, mask_token, decoder_pos_embed, enc_idx, shifted[:, T - 1:])


def unshuffle(pred: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Decoder rows [B, L, P] in the shuffle order of :func:`decoder_tokens` (cls row removed) back to
    raster order, what MAE's ``forward_decoder`` returns: ``pred[b, ids_restore[b]]``."""
    return gather_tokens(pred, ids_restore)


def loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = False) -> torch.Tensor:
    """``forward_loss``: mean over the removed patches of the per-patch mean squared error.

    pred, target: [B, L, P] in raster order (target = :func:`patchify` of the images or MAE's own);
    mask: [B, L], nonzero on removed patches. norm_pix_loss: MAE's per-patch normalisation (unbiased
    variance, 1e-6 inside the root), computed on the fly. Kept patches get zero gradient, as under
    MAE's mask; with no removed patch the loss is 0 (MAE's would be NaN).
    """
    B, L, _ = pred.shape
    rows = torch.arange(L, device=pred.device).expand(B, L)
    return masked_mse_loss(pred, target, rows, mask != 0, norm_pix=norm_pix_loss, eps=1e-6, unbiased=True,
                           eps_on="var")
