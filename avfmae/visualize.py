"""Reconstruction pictures for the end of pre-training: input, masked input, reconstruction.

Video rows show two frames of each clip (un-normalised with the data pipeline's mean/std); audio rows
show the log-mel spectrogram (time on x). Masked-out patches are drawn grey; in the reconstruction
the decoder's predictions replace the patches it was asked for (``masks.*_decode``), mapped back from
norm-pix space with each true patch's own mean and std (the MAE visualisation convention), and the
encoder-visible patches are shown as they were. The frames shown open their tubelets, whose target is
the frame itself also with frame-difference targets (``frame_diff_target``), so the pictures hold then.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mae_kernels import indices_to_mask

from dali_pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

from .config import ModelConfig
from .embed import fill_predictions, patchify_audio, patchify_video, unpatchify_audio, unpatchify_video


def _keep_only(patches: torch.Tensor, idx: torch.Tensor, fill: float) -> torch.Tensor:
    """Patches with every row outside ``idx`` set to ``fill`` ([B, N, P])."""
    keep = indices_to_mask(idx, patches.shape[1])
    return torch.where(keep.unsqueeze(-1), patches, torch.full_like(patches, fill))


def _shown(patches: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor, decode: torch.Tensor,
           norm_groups: int, blank: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction) patches: visible rows kept, predicted rows filled, rest ``blank``."""
    masked = _keep_only(patches, visible, blank)
    recon = fill_predictions(patches, pred, decode, norm_groups=norm_groups)
    return masked, _keep_only(recon, torch.cat([visible, decode], dim=1), blank)


def video_panels(video: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor, decode: torch.Tensor,
                 cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, masked input, reconstruction), each [B, 3, T, H, W] in the input's normalised space."""
    patches = patchify_video(video.float(), cfg.tubelet, cfg.patch_size)
    masked, recon = _shown(patches, pred, visible, decode, norm_groups=3, blank=0.0)  # 0 = mean grey
    return tuple(unpatchify_video(p, cfg.video_grid, cfg.tubelet, cfg.patch_size) for p in (patches, masked, recon))


def audio_panels(audio: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor, decode: torch.Tensor,
                 cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, masked input, reconstruction), each [B, 1, T_a, F]."""
    patches = patchify_audio(audio.float(), cfg.audio_patch)
    masked, recon = _shown(patches, pred, visible, decode, norm_groups=1, blank=float(patches.min()))
    return tuple(unpatchify_audio(p, cfg.audio_grid, cfg.audio_patch) for p in (patches, masked, recon))


def _to_image(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, H, W] normalised -> [H, W, 3] in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (frames.cpu() * s + m).clamp(0, 1).permute(1, 2, 0)


def save_reconstructions(out: dict[str, Any], batch: dict[str, torch.Tensor], cfg: ModelConfig,
                         path: str | Path, clips: int = 2, video_mean: Sequence[float] = IMAGENET_MEAN,
                         video_std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write a PNG of ``clips`` clips from a pre-training forward with ``return_predictions=True``.

    ``out`` holds ``pred_video``, ``pred_audio`` and ``masks``; ``batch`` the ``video`` and ``audio``
    it was computed from. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = out["masks"]
    n = min(clips, batch["video"].shape[0])
    cpu = {k: v[:n].detach().cpu() for k, v in (("video", batch["video"]), ("audio", batch["audio"]))}
    vis = {name: getattr(masks, name)[:n].cpu() for name in ("video_visible", "video_decode",
                                                             "audio_visible", "audio_decode")}
    video = video_panels(cpu["video"], out["pred_video"][:n].cpu(), vis["video_visible"], vis["video_decode"], cfg)
    audio = audio_panels(cpu["audio"], out["pred_audio"][:n].cpu(), vis["audio_visible"], vis["audio_decode"], cfg)
    frames = (0, cfg.num_frames // 2)
    titles = ("input", "masked input", "reconstruction")
    fig, axes = plt.subplots(n * 3, 3, figsize=(9, 3.2 * n * 3), squeeze=False)
    for i in range(n):
        for col, title in enumerate(titles):
            for r, t in enumerate(frames):
                ax = axes[i * 3 + r, col]
                ax.imshow(_to_image(video[col][i, :, t], video_mean, video_std).numpy())
                ax.set_title(f"clip {i} frame {t}: {title}", fontsize=8)
            ax = axes[i * 3 + 2, col]
            ax.imshow(audio[col][i, 0].T.numpy(), origin="lower", aspect="auto", cmap="magma")
            ax.set_title(f"clip {i} fbank: {title}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
