"""facebookresearch/mae (``models_mae.py``) conventions, mapped onto the ops.

MAE shuffles each sample's L patch tokens with ``ids_shuffle = argsort(noise)``, keeps the first
``len_keep`` (``ids_keep = ids_shuffle[:, :len_keep]``), and unshuffles the decoder input with the
inverse permutation ``ids_restore = argsort(ids_shuffle)``. Its positional tables are ``[1, 1 + L, C]``
with the cls token's entry first.

The ops take *forward* positions (which patch each row holds): that is ``ids_shuffle``, never
``ids_restore``. These helpers take ``ids_shuffle`` by name so the two cannot be swapped.

The decoder input is built in shuffle order ``[cls, kept..., masked...]`` in one pass instead of
``cat`` + unshuffling ``gather`` + positional add: MAE's decoder is plain self-attention, equivariant to
the order of its tokens, so the predictions are the same rows in another order. :func:`loss` reads them
in that order; :func:`unshuffle` puts them back in raster order (for visualisation).
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


def decoder_tokens(x: torch.Tensor, mask_token: torch.Tensor, decoder_pos_embed: torch.Tensor,
                   ids_shuffle: torch.Tensor) -> torch.Tensor:
    """The decoder input of ``forward_decoder`` (after ``decoder_embed``), in shuffle order: [B, 1 + L, C].

    x: [B, 1 + len_keep, C] (cls first); mask_token: [1, 1, C]; decoder_pos_embed: [1, 1 + L, C].
    Row 0 is cls + pos[0]; then the kept tokens at their positions; then one mask token per masked
    position. One pass: the cls token is treated as position 0 of the table.
    """
    B, T, _ = x.shape
    shifted = ids_shuffle + 1  # table row of each patch (row 0 is the cls token's)
    enc_idx = torch.cat([shifted.new_zeros(B, 1), shifted[:, :T - 1]], dim=1)
    return assemble_decoder_tokens(x, mask_token, decoder_pos_embed, enc_idx, shifted[:, T - 1:])


def loss(pred: torch.Tensor, target: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int,
         norm_pix_loss: bool = False) -> torch.Tensor:
    """``forward_loss``: mean over the masked patches of the per-patch mean squared error.

    pred: [B, L, P] decoder predictions in the shuffle order :func:`decoder_tokens` produced, cls row
    removed; target: [B, L, P] = :func:`patchify` of the images (raster order). norm_pix_loss: MAE's
    per-patch normalisation (unbiased variance, 1e-6 inside the root). Kept rows get zero gradient,
    as under MAE's mask.
    """
    return masked_mse_loss(pred[:, len_keep:], target, ids_shuffle[:, len_keep:], norm_pix=norm_pix_loss,
                           eps=1e-6, unbiased=True, eps_on="var")


def unshuffle(pred: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Predictions [B, L, P] in shuffle order back to raster order (what MAE's ``forward`` returns)."""
    return gather_tokens(pred, ids_restore)
