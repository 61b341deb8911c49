"""Multi-view evaluation: which views (``test_clips`` x ``test_crops``) and how a clip's views merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .train_config import TrainConfig


def eval_views(cfg: TrainConfig) -> list[tuple[int, int, int, int] | None]:
    """The evaluation views, (clip_index, num_clips, crop_index, num_crops) for every (clip, crop) pair;
    ``[None]`` (the loader's default centred window and centre crop) for 1 x 1."""
    if (cfg.test_clips, cfg.test_crops) == (1, 1):
        return [None]
    return [(c, cfg.test_clips, k, cfg.test_crops) for c in range(cfg.test_clips) for k in range(cfg.test_crops)]


def average_views(outputs: list[Any], regression: bool) -> Any:
    """One prediction per clip from its views' outputs (each [N, ...] in the same clip order).

    Classification: the mean of the per-view softmax probabilities (VideoMAE/HiCMAE's test merge);
    regression: the mean of the outputs. A single view comes back unchanged (logits), which leaves
    arg-max metrics as they were without views.
    """
    if not outputs:
        raise ValueError("outputs must hold at least one view")
    if len({tuple(o.shape) for o in outputs}) != 1:
        raise ValueError(f"outputs: every view must give the same shape, got {[tuple(o.shape) for o in outputs]}")
    if len(outputs) == 1:
        return outputs[0]
    stacked = torch.stack([o.float() for o in outputs])
    return stacked.mean(0) if regression else stacked.softmax(-1).mean(0)
