"""Pre-training losses (paper eqs. 1 and 3).

    L = MSE_v + MSE_a + lambda * sum_k InfoNCE(e_a^k, e_v^k)

* MSE (eq. 3): ``mae_kernels.masked_mse_loss`` over the decoder's predictions, with per-patch
  normalised targets (video: per colour channel, ``norm_groups=3`` on (c t p p) patches), counting
  only decoder targets the encoder did not see (``valid``) and averaging over those of the whole
  batch, as DESIGN.md says. Eq. 3 itself divides the same sum by the decoder-target count
  (1 - rho_d) * N_m, valid or not, i.e. it is this loss times the batch's valid fraction. The input
  normalisation (ImageNet mean/std) need not be undone first: per-patch, per-channel normalisation
  cancels any positive per-channel affine map.
* Frame-difference option (reference code): targets are normalised first, then in every tubelet
  frame j >= 1 is replaced by frame j - frame 0, and the loss runs without further normalisation.
* HCMCL: for every selected encoder layer, e_m = L2-normalised mean of the layer's normalised
  local tokens; symmetric InfoNCE with temperature tau over the *global* batch — features of all
  ranks are all-gathered (with gradient) when torch.distributed is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mae_kernels import masked_mse_loss
from mae_kernels.masked_mse_loss import normalise_patches

from .embed import frame_difference


def reconstruction_loss(pred: torch.Tensor, patches: torch.Tensor, decode_idx: torch.Tensor,
                        valid: torch.Tensor | None, norm_groups: int = 1,
                        frame_diff_tubelet: int | None = None) -> torch.Tensor:
    """Eq. 3 for one modality: fp32 scalar.

    pred [B, Md, P] predictions for the patches ``decode_idx`` [B, Md] of ``patches`` [B, N, P];
    valid [B, Md] bool (rows that count). ``frame_diff_tubelet`` switches on frame-difference
    targets for video patches laid out (c t p p).
    """
    if frame_diff_tubelet is None:
        return masked_mse_loss(pred, patches, decode_idx, valid, norm_pix=True, norm_groups=norm_groups)
    with torch.no_grad():
        target = frame_difference(normalise_patches(patches, norm_groups), frame_diff_tubelet).to(pred.dtype)
    return masked_mse_loss(pred, target, decode_idx, valid, norm_pix=False)


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [b, ...] from every rank along dim 0 (differentiable); ``x`` itself when
    not running distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def info_nce(e_v: torch.Tensor, e_a: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised features e_v, e_a [b, C] of this rank's samples,
    contrasted with the global batch. fp32 scalar: 0.5 * (CE(v->a) + CE(a->v))."""
    e_v, e_a = e_v.float(), e_a.float()
    all_v, all_a = gather_across_ranks(e_v), gather_across_ranks(e_a)
    rank = dist.get_rank() if all_v.shape[0] != e_v.shape[0] else 0
    labels = torch.arange(e_v.shape[0], device=e_v.device) + rank * e_v.shape[0]
    loss_v = F.cross_entropy(e_v @ all_a.t() / temperature, labels)
    loss_a = F.cross_entropy(e_a @ all_v.t() / temperature, labels)
    return 0.5 * (loss_v + loss_a)


def pooled_embedding(hidden: torch.Tensor) -> torch.Tensor:
    """Sample-level feature of a layer: mean over tokens, L2-normalised. [B, M, C] -> [B, C] (fp32)."""
    return F.normalize(hidden.float().mean(dim=1), dim=-1)


def hcmcl_loss(video_hidden: Sequence[torch.Tensor], audio_hidden: Sequence[torch.Tensor],
               temperature: float = 0.07) -> torch.Tensor:
    """HCMCL: sum over the selected layers of the symmetric InfoNCE of pooled video/audio features."""
    if len(video_hidden) != len(audio_hidden) or not video_hidden:
        raise ValueError(f"need the same, non-zero number of video and audio layers, got "
                         f"{len(video_hidden)} and {len(audio_hidden)}")
    return sum(info_nce(pooled_embedding(v), pooled_embedding(a), temperature)
               for v, a in zip(video_hidden, audio_hidden))
