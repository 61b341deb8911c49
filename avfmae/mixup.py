"""Mixup / CutMix for audio-visual fine-tuning (the supervised PSI stages), without timm.

Recipe (the reference fine-tuning code of HiCMAE and AVF-MAE++, ``run_class_finetuning_av.py``, uses
timm's ``Mixup`` with mixup_alpha 0.8, cutmix_alpha 1.0, prob 1.0, switch_prob 0.5, mode "batch",
label smoothing 0.1):

- One decision per batch: CutMix with probability ``switch_prob`` when both alphas are > 0, else
  mixup (or whichever single one is enabled); every batch is mixed (timm's prob = 1.0).
- Each clip i is mixed with clip B-1-i (the batch flipped), which is why the batch must be even:
  with an odd batch the middle clip would be mixed with itself under a mixed target.
- mixup: λ ~ Beta(α, α); x = λ·x + (1-λ)·flip(x).
- CutMix: λ ~ Beta(α, α); a box of side fractions sqrt(1-λ) with a uniformly drawn centre, clipped
  at the frame border, is pasted from the flipped batch into the same place of *every frame* (the
  tube keeps the clip temporally coherent); λ is then corrected to 1 - box area / frame area, so the
  target matches the pixels actually exchanged.
- Soft targets with label smoothing folded in as timm does: off = ε/C, on = 1-ε+ε/C, then
  λ·y + (1-λ)·flip(y). They already carry the smoothing: the loss must not smooth them again.

The mixer has no defaults of its own: the training config (``TrainConfig``: ``mixup``, ``cutmix``,
``mixup_switch_prob``, ``label_smoothing``, ``mixup_audio``) owns them and the trainer passes each.

Audio (the spectrogram [B, 1, T_a, F]). Checked against the stored reference code
(sunlicai/HiCMAE and XuecWu/AVF-MAE, ``engine_for_finetuning_av.py``): it calls
``mixup_fn(samples, targets)`` on the video only and feeds the audio unmixed, so the mixed target
describes the video but not the audio. ``mix_audio=False`` reproduces that and is the training
default (``mixup_audio: false``); ``mix_audio=True`` mixes the audio with the same pairing and the
same λ so the target describes both modalities. Under CutMix the audio gets a *time band* (all mel
bins) from the flipped clip covering the fraction 1-λ of the frames (rounded to whole frames, drawn uniformly inside the
spectrogram) rather than a blend: like the video box it exchanges content instead of superimposing
it, and a band of time frames is the spectrogram's natural "region". The target uses the video's λ;
the audio fraction differs from it by at most half a frame (1/512 at 256 frames).

Randomness comes from the global torch RNG (CPU generator), which the trainer seeds every step, so a
resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixedBatch:
    video: torch.Tensor                       # [B, 3, T, H, W]
    audio: torch.Tensor | None                # [B, 1, T_a, F] or None
    target: torch.Tensor                      # [B, num_classes] float32, rows sum to 1
    lam: float                                # weight of each clip's own label (box-corrected for CutMix)
    mode: str                                 # "mixup" | "cutmix"
    box: tuple[int, int, int, int] | None     # CutMix video box (y0, y1, x0, x1)
    audio_band: tuple[int, int] | None        # CutMix audio time band (t0, t1)


def soft_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """λ·smooth(one_hot(labels)) + (1-λ)·smooth(one_hot(flip(labels))), float32 [B, num_classes]."""
    off = smoothing / num_classes
    one_hot = F.one_hot(labels.long(), num_classes).float() * (1.0 - smoothing) + off
    return lam * one_hot + (1.0 - lam) * one_hot.flip(0)


def sample_box(height: int, width: int, lam: float) -> tuple[tuple[int, int, int, int], float]:
    """A box of side fractions sqrt(1-λ) around a uniform centre, clipped to the frame; returns
    ((y0, y1, x0, x1), corrected λ = 1 - box area / frame area)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    y0c, y1c = max(y0, 0), min(y0 + cut_h, height)
    x0c, x1c = max(x0, 0), min(x0 + cut_w, width)
    area = max(y1c - y0c, 0) * max(x1c - x0c, 0)
    return (y0c, y1c, x0c, x1c), 1.0 - area / (height * width)


def sample_band(length: int, fraction: float) -> tuple[int, int]:
    """A contiguous run of round(fraction·length) positions, placed uniformly inside [0, length)."""
    size = min(length, max(0, round(fraction * length)))
    start = int(torch.randint(0, length - size + 1, ()))
    return start, start + size


def _check_number(name: str, value, low: float, high: float, *, high_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (value == high and not high_inclusive):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


class AudioVisualMixup:
    """Batch-level mixup / CutMix of video (and audio) with smoothed soft targets; see the module doc.

    Args (all required: the training config owns the defaults):
        num_classes: classes of the soft targets.
        mixup_alpha: Beta(α, α) of mixup; 0 disables mixup (reference recipe: 0.8).
        cutmix_alpha: Beta(α, α) of CutMix; 0 disables CutMix (reference: 1.0). At least one must be > 0.
        switch_prob: probability of CutMix (instead of mixup) when both are enabled (reference: 0.5).
        label_smoothing: ε folded into the soft targets (reference: 0.1).
        mix_audio: mix the audio like the video (True) or leave it as is (False: the reference code).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                 label_smoothing: float, mix_audio: bool) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.mixup_alpha = _check_number("mixup_alpha", mixup_alpha, 0.0, math.inf, high_inclusive=False)
        self.cutmix_alpha = _check_number("cutmix_alpha", cutmix_alpha, 0.0, math.inf, high_inclusive=False)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: nothing to mix (do not build the mixer)")
        self.switch_prob = _check_number("switch_prob", switch_prob, 0.0, 1.0, high_inclusive=True)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=False)
        self.mix_audio = bool(mix_audio)

    def __call__(self, video: torch.Tensor, audio: torch.Tensor | None, labels: torch.Tensor, *,
                 validate: bool = False) -> MixedBatch:
        """Mix a batch; the inputs are not modified. Shapes and dtypes are always checked; the label
        values only with ``validate=True``: reading device labels is a host sync, and the trainer's labels
        were checked where they are made (``dali_pipelines.read_manifest``)."""
        self._check_inputs(video, audio, labels)
        if validate and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got {labels.tolist()}")
        mode, lam = self._draw()
        box = band = None
        if mode == "mixup":
            video = torch.lerp(video.flip(0), video, lam)   # λ·x + (1-λ)·flip(x)
            if audio is not None and self.mix_audio:
                audio = torch.lerp(audio.flip(0), audio, lam)
        else:
            box, lam = sample_box(video.shape[-2], video.shape[-1], lam)
            y0, y1, x0, x1 = box
            video = video.clone()
            video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]   # same box on every frame
            if audio is not None and self.mix_audio:
                band = sample_band(audio.shape[-2], 1.0 - lam)
                audio = audio.clone()
                audio[..., band[0]:band[1], :] = audio.flip(0)[..., band[0]:band[1], :]
        target = soft_targets(labels, self.num_classes, lam, self.label_smoothing).to(labels.device)
        return MixedBatch(video, audio, target, lam, mode, box, band)

    def _draw(self) -> tuple[str, float]:
        """(mode, λ) of this batch from the global torch RNG."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            mode = "cutmix" if float(torch.rand(())) < self.switch_prob else "mixup"
        else:
            mode = "mixup" if self.mixup_alpha > 0 else "cutmix"
        alpha = torch.tensor(self.mixup_alpha if mode == "mixup" else self.cutmix_alpha, dtype=torch.float64)
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return mode, lam

    def _check_inputs(self, video: torch.Tensor, audio: torch.Tensor | None, labels: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or not video.is_floating_point():
            raise ValueError(f"video must be a float tensor [B, 3, T, H, W], got "
                             f"{getattr(video, 'shape', type(video))} {getattr(video, 'dtype', '')}")
        batch = video.shape[0]
        if batch < 2 or batch % 2:
            raise ValueError(f"video: mixup pairs clip i with clip B-1-i and needs an even batch >= 2, got B={batch}")
        if audio is not None and (not isinstance(audio, torch.Tensor) or audio.dim() != 4
                                  or not audio.is_floating_point() or audio.shape[0] != batch):
            raise ValueError(f"audio must be None or a float tensor [B={batch}, 1, T_a, F], got "
                             f"{getattr(audio, 'shape', type(audio))} {getattr(audio, 'dtype', '')}")
        if (not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point()
                or labels.dtype == torch.bool):
            raise ValueError(f"labels must be integer class indices [B={batch}], got "
                             f"{getattr(labels, 'shape', type(labels))} {getattr(labels, 'dtype', '')}")
