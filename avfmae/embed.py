"""Token embeddings, fixed positional tables and patch layouts for the loss targets.

Token order is raster order everywhere outside the encoders: video tokens (t, h, w), audio tokens
(time, freq). Video patches are laid out channel-major, ``(c pt ph pw)`` (1536 values at the default
size), so per-colour-channel normalisation is a normalisation over 3 contiguous groups
(``masked_mse_loss(..., norm_groups=3)``); audio patches are ``(ph pw)`` (256 values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from mae_kernels import gather_tokens
from mae_kernels.masked_mse_loss import denormalise_patches
from torch import nn

VIDEO_PATCH_LAYOUT = "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)"
AUDIO_PATCH_LAYOUT = "b c (h ph) (w pw) -> b (h w) (c ph pw)"


class _PatchProjection:
    """A conv with kernel = stride is a Linear over each flattened patch, (c k...) order. Called on the
    image/video it runs the conv over every patch; called with ``flattened=True`` on gathered patches
    ``[B, M, P]`` (laid out by :func:`patchify_video` / :func:`patchify_audio`) it runs the same weights
    as that Linear, so an encoder embeds only the tokens it keeps. One module either way: ZeRO-3 gathers
    its weights around both calls."""

    weight: nn.Parameter
    bias: nn.Parameter

    # MAE: initialise the patch projection like a Linear over the flattened patch. Done in
    # reset_parameters so it runs inside the conv's own __init__ (ZeRO-3 partitions right after).
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight.view(self.weight.shape[0], -1))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, flattened: bool = False) -> torch.Tensor:
        if flattened:
            return F.linear(x, self.weight.flatten(1), self.bias)
        return super().forward(x)  # type: ignore[misc]


class _PatchConv3d(_PatchProjection, nn.Conv3d):
    pass


class _PatchConv2d(_PatchProjection, nn.Conv2d):
    pass


def _gather_rows(patches: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # plain indexing, not gather_tokens: the input needs no gradient, and inductor folds the patch
    # layout into this gather's loads (the patchified copy of the whole input is never written)
    return torch.take_along_dim(patches, rows.unsqueeze(-1), dim=1)


class CubeEmbed(nn.Module):
    """Video cube embedding: Conv3d with kernel = stride = (tubelet, patch, patch).

    ``[B, 3, T, H, W] -> [B, (T/tubelet)(H/patch)(W/patch), C]`` in raster (t, h, w) order; with
    ``rows [B, M]`` (raster positions) only those tokens, in that order: ``embed(v)[b, rows[b]]``
    without spending a FLOP on the others.
    """

    def __init__(self, dim: int, tubelet: int = 2, patch: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.proj = _PatchConv3d(in_chans, dim, (tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, video: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            return self.proj(_gather_rows(patchify_video(video, self.tubelet, self.patch), rows), flattened=True)
        return rearrange(self.proj(video), "b c t h w -> b (t h w) c")


class PatchEmbed(nn.Module):
    """Audio patch embedding: Conv2d with kernel = stride = patch.

    ``[B, 1, T_a, F] -> [B, (T_a/patch)(F/patch), C]`` in raster (time, freq) order; ``rows`` as in
    :class:`CubeEmbed`.
    """

    def __init__(self, dim: int, patch: int = 16, in_chans: int = 1) -> None:
        super().__init__()
        self.patch = patch
        self.proj = _PatchConv2d(in_chans, dim, patch, stride=patch)

    def forward(self, audio: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            return self.proj(_gather_rows(patchify_audio(audio, self.patch), rows), flattened=True)
        return rearrange(self.proj(audio), "b c h w -> b (h w) c")


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sine-cosine table [num_positions, dim] (Transformer / VideoMAE convention):
    even channels sin(p / 10000^(2i/dim)), odd channels cos of the same angle."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    pair = torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * pair / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)


def patchify_video(video: torch.Tensor, tubelet: int = 2, patch: int = 16) -> torch.Tensor:
    """``[B, 3, T, H, W] -> [B, N, 3 * tubelet * patch^2]``, rows in raster order, values (c pt ph pw)."""
    return rearrange(video, VIDEO_PATCH_LAYOUT, pt=tubelet, ph=patch, pw=patch)


def unpatchify_video(patches: torch.Tensor, grid: tuple[int, int, int], tubelet: int = 2,
                     patch: int = 16) -> torch.Tensor:
    """Inverse of :func:`patchify_video`; ``grid`` is the token grid (t, h, w)."""
    t, h, w = grid
    return rearrange(patches, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                     t=t, h=h, w=w, pt=tubelet, ph=patch, pw=patch)


def patchify_audio(audio: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """``[B, 1, T_a, F] -> [B, N, patch^2]``, rows in raster (time, freq) order."""
    return rearrange(audio, AUDIO_PATCH_LAYOUT, ph=patch, pw=patch)


def unpatchify_audio(patches: torch.Tensor, grid: tuple[int, int], patch: int = 16) -> torch.Tensor:
    """Inverse of :func:`patchify_audio`; ``grid`` is the token grid (time, freq)."""
    h, w = grid
    return rearrange(patches, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=patch, pw=patch)


def frame_difference(patches: torch.Tensor, tubelet: int = 2) -> torch.Tensor:
    """Frame-difference video target: in every tubelet keep frame 0 and replace frame j >= 1 by
    frame j - frame 0 (per colour channel), on ``(c pt ph pw)`` patches."""
    x = rearrange(patches, "b n (c pt s) -> b n c pt s", c=3, pt=tubelet)
    diff = torch.cat([x[:, :, :, :1], x[:, :, :, 1:] - x[:, :, :, :1]], dim=3)
    return rearrange(diff, "b n c pt s -> b n (c pt s)")


def fill_predictions(patches: torch.Tensor, pred: torch.Tensor, idx: torch.Tensor, norm_groups: int = 1,
                     norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Patches with the rows ``idx`` replaced by the predictions, for visualising reconstructions.

    Predictions of a norm-pix model live in normalised space; they are mapped back with the mean
    and standard deviation of the true patch they replace (the MAE visualisation convention).
    patches [B, N, P], pred [B, M, P], idx [B, M] -> [B, N, P] (no gradient).
    """
    with torch.no_grad():
        out = patches.detach().float().clone()
        rows = gather_tokens(out, idx)
        values = pred.detach().float()
        if norm_pix:
            values = denormalise_patches(values, rows, norm_groups, eps)
        out.scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, out.shape[-1]), values)
    return out.to(patches.dtype)

