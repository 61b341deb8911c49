"""MCG-NJU/VideoMAE (``modeling_pretrain.py``, ``engine_for_pretraining.py``) conventions, mapped onto
the ops; sunlicai/HiCMAE follows the same conventions for its video and audio branches.

VideoMAE carries a boolean mask ``bool_masked_pos`` [B, N] (True = masked) with the same number of
masked tokens in every row (tube masking: ``int(mask_ratio * N)``), selects tokens with
``x[~mask].reshape(B, -1, C)``, and builds the decoder input as ``cat(x_vis + pos[~mask],
mask_token + pos[mask])`` -- the exact layout of :func:`mae_kernels.assemble_decoder_tokens`.

Its target: the ImageNet-normalised clip is unnormalised (``videos * std + mean``), cut into
``(p0 p1 p2 c)`` channel-last patches, and (``normalize_target``) normalised per colour channel with
the unbiased std and 1e-6 added to the std; the loss is ``nn.MSELoss`` over the masked rows.
"""

from __future__ import annotations

import torch

from ..assemble_decoder_tokens import assemble_decoder_tokens
from ..gather_tokens import gather_tokens
from ..masked_mse_loss import masked_mse_loss
from ..masks import mask_to_indices

# timm's ImageNet statistics (VideoMAE's input normalisation). The project's one owner: dali_pipelines.spec
# re-exports them as IMAGENET_MEAN / IMAGENET_STD for its loaders and avfmae.visualize.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def mask_indices(bool_masked_pos: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [B, N - num_masked], masked [B, num_masked]) positions, each in raster order -- the rows
    ``x[~mask]`` and ``x[mask]`` select.

    ``num_masked``: the sampler's count per row (``int(mask_ratio * N)`` for tube masking): no host
    sync. VideoMAE's model is not told its mask ratio; left None, the count is read from the first row
    (one host sync, where the boolean indexing it replaces makes one per indexing).
    """
    mask = bool_masked_pos.flatten(1).to(torch.bool)
    N = mask.shape[1]
    if num_masked is None:
        num_masked = int(mask[0].sum())
    return mask_to_indices(~mask, N - num_masked), mask_to_indices(mask, num_masked)


def encoder_tokens(x: torch.Tensor, pos_embed: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``(x + pos_embed)[~mask].reshape(B, -1, C)`` in one pass: x [B, N, C], pos_embed [1, N, C]."""
    return gather_tokens(x, visible, pos_embed)


def add_positions(x_vis: torch.Tensor, pos_embed: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``x_vis + pos[~mask].reshape(B, -1, C)`` for tokens already selected (HiCMAE's intermediate encoder
    features): one pass, the decoder-input op with no mask token."""
    no_masked = visible[:, :0]
    return assemble_decoder_tokens(x_vis, x_vis.new_zeros(x_vis.shape[-1]), pos_embed, visible, no_masked)


def decoder_tokens(x_vis: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor, visible: torch.Tensor,
                   masked: torch.Tensor) -> torch.Tensor:
    """``cat([x_vis + pos[~mask], mask_token + pos[mask]], 1)`` in one pass: [B, N_vis + N_mask, C]."""
    return assemble_decoder_tokens(x_vis, mask_token, pos_embed, visible, masked)


def patchify(clip: torch.Tensor, patch_size: int, tubelet_size: int = 2) -> torch.Tensor:
    """Channel-last patches: video [B, C, T, H, W] -> [B, (t h w), (p0 p1 p2 c)] (VideoMAE's rearrange);
    audio / image [B, C, H, W] -> [B, (h w), (p1 p2 c)] (HiCMAE's audio branch).

    Raises:
        ValueError: clip neither 4-D nor 5-D, or its T/H/W not divisible by tubelet_size/patch_size.
    """
    p = patch_size
    if clip.dim() == 4:
        B, C, H, W = clip.shape
        if H % p or W % p:
            raise ValueError(f"clip [H={H}, W={W}] must divide by patch_size={p}")
        x = clip.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)
    if clip.dim() != 5:
        raise ValueError(f"clip must be [B, C, T, H, W] or [B, C, H, W], got shape {tuple(clip.shape)}")
    B, C, T, H, W = clip.shape
    t = tubelet_size
    if T % t or H % p or W % p:
        raise ValueError(f"clip [T={T}, H={H}, W={W}] must divide by tubelet_size={t} and patch_size={p}")
    x = clip.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)


def loss(pred: torch.Tensor, clip: torch.Tensor, masked: torch.Tensor, patch_size: int, tubelet_size: int = 2,
         normalize_target: bool = True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """The pre-training loss of ``engine_for_pretraining.py``: MSE between pred [B, N_mask, P] (the
    decoder's rows for the masked tokens, raster order) and the target recipe above.

    clip: the model's input, normalised with (mean, std); pass ``mean=None, std=None`` for inputs used
    as they are (HiCMAE's audio spectrograms). The target is built without gradient.
    """
    with torch.no_grad():
        if mean is not None:
            shape = (1, -1) + (1,) * (clip.dim() - 2)
            clip = clip * torch.as_tensor(std, device=clip.device).view(shape) \
                + torch.as_tensor(mean, device=clip.device).view(shape)
        patches = patchify(clip, patch_size, tubelet_size)
    return masked_mse_loss(pred, patches, masked, norm_pix=normalize_target, eps=1e-6, norm_groups=clip.shape[1],
                           unbiased=True, eps_on="std", channels_last=True)
