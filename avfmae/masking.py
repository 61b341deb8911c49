"""Mask generators for pre-training (DESIGN.md "Masking").

Every generator returns an int64 index tensor [B, M] of token positions in raster order, sorted per
row, with the same M for every sample (so batches stay rectangular). Randomness comes from the
optional ``torch.Generator`` (the global RNG when None); indices are drawn on the generator's
device and moved to ``device``.

* Encoder masks return the *visible* positions. They are region-aware: every LGI region keeps the
  same number of tokens, so region attention needs no padding.
  - video: tube masking (one spatial mask shared by all time steps), chosen per spatial block of a
    region so each block keeps (1 - ratio) of its positions (5 of 50 at ratio 0.9);
  - audio: random masking per region (3 of 16 at ratio 0.8125).
* Decoder masks return the *decoder-visible* positions (those that get a mask token and a
  prediction), drawn over all N positions independently of the encoder mask (VideoMAE V2 dual
  masking):
  - video: running-cell masking — one 2x2 cell pattern keeping (1 - ratio) * 4 positions, tiled
    over the frame and rolled by one step per time step, from a random start per sample;
  - audio: plain random masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from mae_kernels import indices_to_mask, mask_to_indices  # the owners of positions <-> bool masks (no host sync)

from .config import ModelConfig, kept_count  # kept_count's owner: the config validates ratios with it


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _random_subsets(batch: int, groups: int, size: int, keep: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[B, groups, keep] sorted positions in [0, size), a uniform random subset per group."""
    scores = torch.rand(batch, groups, size, generator=generator, device=_generator_device(generator))
    return scores.argsort(dim=-1)[..., :keep].sort(dim=-1).values


def _block_positions(local: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Map positions inside each (bh, bw) block [B, nblocks, k] to raster positions of a (h, w) grid."""
    h, w = grid
    bh, bw = block
    blocks = torch.arange(local.shape[1], device=local.device)
    row0 = (blocks // (w // bw)) * bh
    col0 = (blocks % (w // bw)) * bw
    rows = row0[None, :, None] + local // bw
    cols = col0[None, :, None] + local % bw
    return rearrange(rows * w + cols, "b n k -> b (n k)")


def region_tube_mask(grid: tuple[int, int, int], region: tuple[int, int, int], ratio: float, batch: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Visible video positions [B, T*S] under region-aware tube masking.

    grid: token grid (t, h, w); region: LGI region size (rt, rh, rw) tiling it. Each (rh, rw) spatial
    block keeps S_b = (1 - ratio) * rh * rw positions, the same for every time step, so every region
    keeps rt * S_b tokens.
    """
    t, h, w = grid
    _, rh, rw = region
    keep = kept_count(ratio, rh * rw)
    local = _random_subsets(batch, (h // rh) * (w // rw), rh * rw, keep, generator)
    spatial = _block_positions(local, (h, w), (rh, rw)).sort(dim=1).values  # [B, S]
    frames = torch.arange(t, device=spatial.device) * (h * w)
    visible = rearrange(frames[None, :, None] + spatial[:, None, :], "b t s -> b (t s)")
    return visible.to(device or spatial.device)


def region_random_mask(grid: tuple[int, int], region: tuple[int, int], ratio: float, batch: int,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Visible audio positions [B, K*k] under region-aware random masking: each (rh, rw) region of the
    (time, freq) grid keeps k = (1 - ratio) * rh * rw positions."""
    h, w = grid
    rh, rw = region
    keep = kept_count(ratio, rh * rw)
    local = _random_subsets(batch, (h // rh) * (w // rw), rh * rw, keep, generator)
    visible = _block_positions(local, grid, region).sort(dim=1).values
    return visible.to(device or visible.device)


def running_cell_mask(grid: tuple[int, int, int], ratio: float, batch: int,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Decoder-visible video positions [B, t * h * w * (1 - ratio)] under running-cell masking.

    The 2x2 cell (flattened row-major) keeps its first (1 - ratio) * 4 entries at shift 0; time step
    i uses the cell rolled by (start + i) mod 4, start drawn per sample. Each frame keeps the same
    count, and over 4 frames every position is kept equally often.
    """
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking needs an even spatial grid, got {grid}")
    keep = kept_count(ratio, 4)
    gen_device = _generator_device(generator)
    start = torch.randint(4, (batch,), generator=generator, device=gen_device)
    shift = (start[:, None] + torch.arange(t, device=gen_device)) % 4                  # [B, t]
    slot = torch.arange(4, device=gen_device)
    cell = (slot[None, None, :] - shift[..., None]) % 4 < keep                        # [B, t, 4]
    mask = repeat(cell, "b t (ch cw) -> b (t nh ch nw cw)", ch=2, cw=2, nh=h // 2, nw=w // 2)
    return mask_to_indices(mask, t * h * w * keep // 4).to(device or gen_device)


def random_mask(num_tokens: int, ratio: float, batch: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Positions [B, (1 - ratio) * N] kept by plain random masking over all N tokens."""
    keep = kept_count(ratio, num_tokens)
    idx = _random_subsets(batch, 1, num_tokens, keep, generator)[:, 0]
    return idx.to(device or idx.device)


def complement(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The sorted positions [B, N - M] that ``idx`` [B, M] (distinct per row) does not list."""
    return mask_to_indices(~indices_to_mask(idx, num_tokens), num_tokens - idx.shape[1])


def contains(idx: torch.Tensor, query: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool [B, Mq]: whether each ``query`` position appears in ``idx`` (same row)."""
    return indices_to_mask(idx, num_tokens).gather(1, query.long())


# --- regions ----------------------------------------------------------------------------------------


def region_index(grid: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """int64 [N]: the LGI region of every raster position; regions are numbered in raster order
    of the region grid (e.g. video (nt, nh, nw) = (4, 2, 1))."""
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    rid = torch.zeros(grid, dtype=torch.int64)
    for c, g, r in zip(coords, grid, region):
        rid = rid * (g // r) + c // r
    return rid.flatten()


def check_region_balance(name: str, idx: torch.Tensor, region_of: torch.Tensor, num_regions: int) -> None:
    """Raise ValueError unless every region holds the same number of the positions idx [B, M] lists.

    Reads the counts back to the host (one sync): call it where masks are made or loaded, not per step.
    """
    batch, m = idx.shape
    regions = region_of.to(idx.device)[idx]  # region_index() builds the map on the CPU
    counts = torch.zeros(batch, num_regions, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(1, regions, torch.ones_like(regions))
    if not bool((counts == m // num_regions).all()):
        raise ValueError(f"{name}: every region must keep the same number of tokens ({m // num_regions}); "
                         f"got per-region counts {counts.tolist()} — use a region-aware mask")


def region_major(idx: torch.Tensor, region_of: torch.Tensor, num_regions: int, validate: bool = False) -> torch.Tensor:
    """Reorder positions [B, M] region by region (raster order inside a region): the order in which
    the LGI-Former consumes and emits tokens. Every region must hold M / num_regions positions, which
    the region-aware generators guarantee by construction; ``validate`` checks it (one host sync)."""
    m = idx.shape[1]
    if m % num_regions:
        raise ValueError(f"idx holds {m} positions per sample, not divisible by {num_regions} regions")
    if validate:
        check_region_balance("idx", idx, region_of, num_regions)
    order = torch.argsort(region_of[idx] * region_of.numel() + idx, dim=1)
    return torch.gather(idx, 1, order)


# --- pre-training masks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainMasks:
    """Index tensors of one pre-training batch (all int64, sorted, raster positions)."""

    video_visible: torch.Tensor   # [B, Mv] positions the video encoder sees
    video_decode: torch.Tensor    # [B, Dv] positions the video decoder predicts
    audio_visible: torch.Tensor   # [B, Ma]
    audio_decode: torch.Tensor    # [B, Da]

    def to(self, device: torch.device | str) -> PretrainMasks:
        """The same masks on ``device``."""
        return PretrainMasks(*(t.to(device, non_blocking=True) for t in (
            self.video_visible, self.video_decode, self.audio_visible, self.audio_decode)))

    def validate(self, cfg: ModelConfig) -> PretrainMasks:
        """Check masks made elsewhere (loaded, hand-written) against ``cfg``; returns self.

        Counts as the configured ratios give them, positions in range, sorted and distinct per row,
        encoder masks region-balanced. Reads the masks back to the host: do it once where masks are
        made, never inside a training step (the samplers here meet all of it by construction).
        """
        # the samplers own the counts; a private generator leaves the caller's random stream alone
        counts = sample_pretrain_masks(cfg, 1, torch.Generator())
        for name in ("video_visible", "video_decode", "audio_visible", "audio_decode"):
            upper = cfg.num_video_tokens if name.startswith("video") else cfg.num_audio_tokens
            count = getattr(counts, name).shape[1]
            idx = getattr(self, name)
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
                raise ValueError(f"masks.{name} must be an int64 tensor [B, {count}], got "
                                 f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
            if idx.shape[1] != count:
                raise ValueError(f"masks.{name} must list {count} positions per sample, got {idx.shape[1]}")
            if not bool(((idx >= 0) & (idx < upper)).all()):
                raise ValueError(f"masks.{name} positions must lie in [0, {upper})")
            if not bool((idx[:, 1:] > idx[:, :-1]).all()):
                raise ValueError(f"masks.{name} must be sorted and distinct per row")
        check_region_balance("masks.video_visible", self.video_visible, region_index(cfg.video_grid, cfg.video_region),
                             cfg.num_video_regions)
        check_region_balance("masks.audio_visible", self.audio_visible, region_index(cfg.audio_grid, cfg.audio_region),
                             cfg.num_audio_regions)
        return self


def sample_pretrain_masks(cfg: ModelConfig, batch: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> PretrainMasks:
    """Encoder and decoder masks for both modalities, as configured by ``cfg``."""
    return PretrainMasks(
        video_visible=region_tube_mask(cfg.video_grid, cfg.video_region, cfg.video_mask_ratio, batch,
                                       generator, device),
        video_decode=running_cell_mask(cfg.video_grid, cfg.video_decoder_mask_ratio, batch, generator,
                                       device),
        audio_visible=region_random_mask(cfg.audio_grid, cfg.audio_region, cfg.audio_mask_ratio, batch,
                                         generator, device),
        audio_decode=random_mask(cfg.num_audio_tokens, cfg.audio_decoder_mask_ratio, batch, generator,
                                 device),
    )
