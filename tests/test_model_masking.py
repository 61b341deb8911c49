"""Mask generators: region-aware encoder masks, running-cell and random decoder masks (property tests)."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from avfmae.config import get_config
from avfmae.masking import (
    complement,
    contains,
    random_mask,
    region_index,
    region_major,
    region_random_mask,
    region_tube_mask,
    running_cell_mask,
    sample_pretrain_masks,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_sorted_unique(idx, upper):
    assert idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "rows must be strictly increasing"
    assert int(idx.min()) >= 0 and int(idx.max()) < upper


def region_counts(idx, region_of, num_regions):
    return torch.stack([torch.bincount(region_of[row], minlength=num_regions) for row in idx])


# --- encoder masks ----------------------------------------------------------------------------------

VIDEO_GEOMETRIES = st.sampled_from([
    # (grid, region, ratio)
    ((8, 10, 10), (2, 5, 10), 0.9),
    ((8, 10, 10), (2, 5, 5), 0.8),
    ((4, 4, 6), (2, 2, 3), 0.5),
    ((2, 6, 4), (1, 3, 4), 0.75),
])


@given(geometry=VIDEO_GEOMETRIES, batch=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_region_tube_mask_properties(geometry, batch, seed):
    grid, region, ratio = geometry
    t, h, w = grid
    vis = region_tube_mask(grid, region, ratio, batch, gen(seed))
    n = t * h * w
    assert_sorted_unique(vis, n)
    # ratio as configured
    assert vis.shape == (batch, round(n * (1 - ratio)))
    # tube: every frame shows the same spatial positions
    frames = vis.view(batch, t, -1)
    spatial = frames - torch.arange(t)[None, :, None] * (h * w)
    assert bool((spatial == spatial[:, :1]).all())
    # region-aware: every LGI region keeps the same number of tokens
    rid = region_index(grid, region)
    k = n // (region[0] * region[1] * region[2])
    counts = region_counts(vis, rid, k)
    assert bool((counts == vis.shape[1] // k).all())


def test_default_video_mask_keeps_5_of_50_per_spatial_half():
    c = get_config("base")
    vis = region_tube_mask(c.video_grid, c.video_region, c.video_mask_ratio, 3, gen(0))
    assert vis.shape == (3, 80)
    frame0 = vis[:, :10]
    assert bool(((frame0 < 50).sum(1) == 5).all()) and bool(((frame0 >= 50).sum(1) == 5).all())


@given(grid_region=st.sampled_from([((16, 8), (4, 4), 0.8125), ((8, 8), (4, 2), 0.5), ((6, 4), (3, 4), 0.75)]),
       batch=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_region_random_mask_properties(grid_region, batch, seed):
    grid, region, ratio = grid_region
    vis = region_random_mask(grid, region, ratio, batch, gen(seed))
    n = grid[0] * grid[1]
    assert_sorted_unique(vis, n)
    assert vis.shape == (batch, round(n * (1 - ratio)))
    k = n // (region[0] * region[1])
    counts = region_counts(vis, region_index(grid, region), k)
    assert bool((counts == vis.shape[1] // k).all())


def test_masks_are_seeded_and_random():
    a = region_random_mask((16, 8), (4, 4), 0.8125, 2, gen(7))
    b = region_random_mask((16, 8), (4, 4), 0.8125, 2, gen(7))
    c = region_random_mask((16, 8), (4, 4), 0.8125, 2, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "samples of one batch draw independent masks"


def test_every_video_position_can_be_visible():
    hits = torch.zeros(100, dtype=torch.bool)
    g = gen(0)
    for _ in range(30):
        vis = region_tube_mask((8, 10, 10), (2, 5, 10), 0.9, 4, g)
        hits[vis[:, :10].flatten()] = True
    assert bool(hits.all())


def test_bad_ratio_raises():
    with pytest.raises(ValueError, match="whole number"):
        region_random_mask((16, 8), (4, 4), 0.8, 1)
    with pytest.raises(ValueError, match="even spatial grid"):
        running_cell_mask((2, 5, 4), 0.5, 1)


# --- decoder masks ----------------------------------------------------------------------------------


@given(grid=st.sampled_from([(8, 10, 10), (4, 4, 6), (3, 2, 2)]), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       batch=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_running_cell_mask_properties(grid, ratio, batch, seed):
    t, h, w = grid
    keep = round(4 * (1 - ratio))
    dec = running_cell_mask(grid, ratio, batch, gen(seed))
    assert_sorted_unique(dec, t * h * w)
    assert dec.shape == (batch, t * h * w * keep // 4)
    mask = torch.zeros(batch, t * h * w, dtype=torch.bool)
    mask.scatter_(1, dec, True)
    cells = mask.view(batch, t, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(batch, t, -1, 4)
    # one cell pattern tiled over the frame, `keep` of 4 kept
    assert bool((cells == cells[:, :, :1]).all()) and bool((cells.sum(-1) == keep).all())
    # the pattern rolls by one slot per time step
    pattern = cells[:, :, 0]                                   # [B, t, 4]
    assert torch.equal(pattern[:, 1:], torch.roll(pattern[:, :-1], shifts=1, dims=-1))


def test_running_cell_covers_every_position_over_four_frames():
    dec = running_cell_mask((4, 10, 10), 0.5, 2, gen(1))
    mask = torch.zeros(2, 400, dtype=torch.bool).scatter_(1, dec, True).view(2, 4, 100)
    assert bool((mask.sum(1) == 2).all())


def test_random_decoder_mask():
    dec = random_mask(128, 0.5, 3, gen(2))
    assert_sorted_unique(dec, 128)
    assert dec.shape == (3, 64)


def test_pretrain_masks_default_sizes_and_independence():
    c = get_config("base")
    m = sample_pretrain_masks(c, 8, gen(3))
    assert m.video_visible.shape == (8, 80) and m.video_decode.shape == (8, 400)
    assert m.audio_visible.shape == (8, 24) and m.audio_decode.shape == (8, 64)
    for idx, n in ((m.video_visible, 800), (m.video_decode, 800), (m.audio_visible, 128), (m.audio_decode, 128)):
        assert_sorted_unique(idx, n)
    # the decoder mask is drawn over all N positions, independently of the encoder mask: it overlaps
    # the visible set somewhere in the batch, and the loss targets are D minus the visible set
    overlap = contains(m.video_visible, m.video_decode, 800)
    assert bool(overlap.any()) and not bool(overlap.all())
    targets = m.video_decode[0][~overlap[0]]
    assert not bool(torch.isin(targets, m.video_visible[0]).any())


# --- index helpers ----------------------------------------------------------------------------------


def test_complement_and_contains():
    idx = torch.tensor([[0, 3, 4], [1, 2, 5]])
    assert complement(idx, 6).tolist() == [[1, 2, 5], [0, 3, 4]]
    q = torch.tensor([[3, 1], [5, 0]])
    assert contains(idx, q, 6).tolist() == [[True, False], [True, False]]


def test_region_index_video_layout():
    rid = region_index((8, 10, 10), (2, 5, 10)).view(8, 10, 10)
    # regions numbered over (t-block, h-block): t 0-1 / rows 0-4 -> 0, t 0-1 / rows 5-9 -> 1, t 2-3 -> 2, ...
    assert rid[0, 0, 0] == 0 and rid[1, 4, 9] == 0 and rid[0, 5, 0] == 1 and rid[2, 0, 0] == 2
    assert rid[7, 9, 9] == 7
    assert torch.bincount(rid.flatten()).tolist() == [100] * 8


def test_region_major_groups_regions_and_keeps_raster_order_inside():
    rid = region_index((8, 10, 10), (2, 5, 10))
    vis = region_tube_mask((8, 10, 10), (2, 5, 10), 0.9, 2, gen(4))
    order = region_major(vis, rid, 8)
    assert torch.equal(order.sort(1).values, vis)
    regions = rid[order].view(2, 8, 10)
    assert bool((regions == torch.arange(8)[None, :, None]).all())
    inside = order.view(2, 8, 10)
    assert bool((inside[..., 1:] > inside[..., :-1]).all())
    # raster order interleaves regions, so region-major order is a real permutation here
    assert not torch.equal(order, vis)


def test_region_major_rejects_unbalanced_regions():
    rid = region_index((16, 8), (4, 4))
    unbalanced = torch.arange(24).unsqueeze(0)          # the first 24 raster positions: regions 0 and 1 only
    with pytest.raises(ValueError, match="same number of tokens"):
        region_major(unbalanced, rid, 8, validate=True)
    region_major(unbalanced, rid, 8)  # trusted by default: no host sync in the training step


def test_pretrain_masks_validate_checks_masks_made_elsewhere():
    from avfmae import sample_pretrain_masks

    cfg = get_config("tiny")
    masks = sample_pretrain_masks(cfg, 3, gen(7))
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    assert masks.validate(cfg) is masks
    torch.testing.assert_close(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    if torch.cuda.is_available():  # masks made on the GPU (the region map is built on the CPU)
        assert masks.to("cuda").validate(cfg).video_visible.is_cuda
    bad_count = dataclasses.replace(masks, audio_decode=masks.audio_decode[:, :-1])
    with pytest.raises(ValueError, match="masks.audio_decode must list"):
        bad_count.validate(cfg)
    out_of_range = dataclasses.replace(masks, video_decode=masks.video_decode + cfg.num_video_tokens)
    with pytest.raises(ValueError, match=r"masks.video_decode positions must lie in \[0, "):
        out_of_range.validate(cfg)
    unsorted = dataclasses.replace(masks, audio_visible=masks.audio_visible.flip(1))
    with pytest.raises(ValueError, match="sorted and distinct"):
        unsorted.validate(cfg)
    first = torch.arange(masks.video_visible.shape[1]).expand(3, -1)  # raster prefix: unbalanced regions
    with pytest.raises(ValueError, match="masks.video_visible: every region must keep"):
        dataclasses.replace(masks, video_visible=first).validate(cfg)
