"""The learning-rate schedule: the reference's linear lr scaling, linear warm-up, per-step cosine decay."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .train_config import TrainConfig


def scaled_lrs(cfg: TrainConfig, global_batch: int) -> tuple[float, float]:
    """(peak, floor) of the lr schedule at ``global_batch``: ``lr`` and ``min_lr`` both scale by
    ``global_batch / lr_batch``. This is the reference's rule (AVF-MAE ``run_mae_pretraining_av.py`` and
    ``run_class_finetuning_av.py`` multiply lr, min_lr and warmup_lr by total_batch / 256; warmup_lr
    never reaches their scheduler, whose warm-up starts at 0: see :func:`lr_at`)."""
    if not (isinstance(global_batch, int) and global_batch >= 1):
        raise ValueError(f"global_batch must be a positive integer, got {global_batch!r}")
    scale = global_batch / cfg.lr_batch
    return cfg.lr * scale, cfg.min_lr * scale


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, minimum: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine to ``minimum`` at the end.

    Warm-up step s gets ``peak * (s + 1) / warmup_steps``. The reference (MAE-family
    ``cosine_scheduler``, ``linspace(0, peak, warmup)``) gives ``peak * s / (warmup - 1)``: its step 0
    runs at lr 0, an AdamW update that moves no weight; both reach the peak at the last warm-up step.
    The cosine part is the reference's: ``progress = (s - warmup) / (total - warmup)``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))
