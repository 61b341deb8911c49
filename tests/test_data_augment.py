"""Training augmentations of the reference recipe in the DALI pipeline (CPU DALI): RandAugment, random
erasing, audio gain — their choices (functions of seed, epoch and row), shapes and determinism."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import ClipSpec, build_loader
from dali_pipelines.augment import (
    ERASE_AREA,
    ERASE_ASPECT,
    RandAugmentSpec,
    apply_rand_augment,
    sample_audio_gain,
    sample_erase_boxes,
    sample_rand_augment,
)
from dali_pipelines.source import VideoInfo, clip_rng, sample_clip
from dali_pipelines.synthetic import generate_dataset

ROWS = 6
BASE = ClipSpec(num_frames=4, frame_stride=2, image_size=64)
REFERENCE_AA = RandAugmentSpec.parse("rand-m7-n4-mstd0.5-inc1")
AUGMENTED = dataclasses.replace(BASE, rand_augment=REFERENCE_AA, erase_prob=1.0, audio_gain=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("aug"), clips=ROWS, classes=ROWS, num_frames=12, size=64)


def by_row(loader) -> dict[int, dict[str, torch.Tensor]]:
    return {int(r): {k: b[k][i] for k in ("video", "audio")} for b in loader for i, r in enumerate(b["index"].tolist())}


def load(manifest, spec, batch_size=3, seed=5, **kw):
    return build_loader(manifest, batch_size, True, device="cpu", num_threads=1, spec=spec, seed=seed, **kw)


def test_parse_reads_timms_config_string():
    assert REFERENCE_AA == RandAugmentSpec(n=4, m=7, mstd=0.5, increasing=True)
    assert RandAugmentSpec.parse("rand-m9") == RandAugmentSpec(n=2, m=9, increasing=False)
    for bad in ("augmix-m5", "rand-m7-x2", "rand-m11", "rand-n0", ""):
        with pytest.raises(ValueError, match="rand_augment"):
            RandAugmentSpec.parse(bad)


def test_choices_are_functions_of_seed_epoch_row_and_leave_the_older_ones_alone():
    info = VideoInfo("vp9", 30, 80, 64)
    plain = sample_clip(info, BASE, clip_rng(1, 2, 3))
    aug = sample_clip(info, AUGMENTED, clip_rng(1, 2, 3))
    assert np.array_equal(plain.frames, aug.frames) and plain.crop == aug.crop
    assert (plain.flip, plain.audio_position) == (aug.flip, aug.audio_position)
    assert plain.rand_augment is None and plain.erase is None and plain.audio_gain == 1.0
    again = sample_clip(info, AUGMENTED, clip_rng(1, 2, 3))
    assert np.array_equal(aug.rand_augment, again.rand_augment) and np.array_equal(aug.erase, again.erase)
    assert aug.audio_gain == again.audio_gain
    # switching one augmentation off does not move another's choices
    no_erase = sample_clip(info, dataclasses.replace(AUGMENTED, erase_prob=0.0), clip_rng(1, 2, 3))
    assert np.array_equal(no_erase.rand_augment, aug.rand_augment) and no_erase.audio_gain == aug.audio_gain
    other = [sample_clip(info, AUGMENTED, clip_rng(1, e, r)) for e, r in ((3, 3), (2, 4))]
    assert all(not np.array_equal(o.rand_augment, aug.rand_augment) for o in other)


def test_rand_augment_choices_cover_the_suite_with_magnitudes_around_m():
    rng = np.random.default_rng(0)
    draws = np.concatenate([sample_rand_augment(REFERENCE_AA, rng) for _ in range(2000)], axis=1)
    assert draws.shape == (3, 8000) and draws.dtype == np.int32
    assert set(draws[0].tolist()) == set(range(len(REFERENCE_AA.suite())))
    assert set(draws[1].tolist()) == {0, 1}
    assert draws[2].min() >= 0 and draws[2].max() <= 10 and abs(draws[2].mean() - 7) < 0.05
    assert 0.2 < (draws[2] != 7).mean() < 0.5  # N(7, 0.5) rounded: P(|x - 7| > 0.5) ~ 0.32
    fixed = sample_rand_augment(RandAugmentSpec(n=3, m=5), rng)
    assert fixed[2].tolist() == [5, 5, 5]


def test_erase_boxes_follow_timms_distribution():
    rng = np.random.default_rng(1)
    boxes = [sample_erase_boxes(0.25, 1, 64, rng) for _ in range(4000)]
    erased = [b[0] for b in boxes if b[0, 2] > 0]
    assert abs(len(erased) / len(boxes) - 0.25) < 0.03
    areas = np.array([h * w / 64**2 for _, _, h, w in erased])
    aspects = np.array([h / w for _, _, h, w in erased])
    assert areas.min() > ERASE_AREA[0] * 0.5 and areas.max() < ERASE_AREA[1] * 1.2
    assert aspects.min() >= ERASE_ASPECT[0] * 0.8 and aspects.max() <= ERASE_ASPECT[1] * 1.25
    assert all(0 <= t and t + h <= 64 and 0 <= left and left + w <= 64 for t, left, h, w in erased)
    assert sample_erase_boxes(0.0, 2, 64, rng).tolist() == [[0] * 4] * 2
    two = sample_erase_boxes(1.0, 2, 64, np.random.default_rng(2))
    assert (two[:, 2:] > 0).all()


def test_audio_gain_is_beta_10_10_plus_half():
    gains = np.array([sample_audio_gain(np.random.default_rng([0, i])) for i in range(4000)])
    assert gains.min() > 0.5 and gains.max() < 1.5
    assert abs(gains.mean() - 1.0) < 0.01 and abs(gains.std() - math.sqrt(1 / 84)) < 0.01  # Beta(10,10) var


def test_rand_augment_applies_one_choice_to_every_frame():
    suite_size = len(REFERENCE_AA.suite())
    rng = np.random.default_rng(3)
    still = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ops = [np.array([[i % suite_size, (i + 5) % suite_size, 2, 9], [1, 0, 1, 0], [7, 8, 6, 7]], np.int32)
           for i in range(4)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, enable_conditionals=True, seed=0)
    def pipe():
        frames, choices = fn.external_source(
            source=lambda: ([np.stack([still] * 3) for _ in range(4)], ops), num_outputs=2, batch=True,
            dtype=[types.UINT8, types.INT32], layout=["FHWC", ""])
        return apply_rand_augment(frames, choices, REFERENCE_AA, 32)

    p = pipe()
    p.build()
    (out,) = p.run()
    videos = [np.array(out[i]) for i in range(4)]
    for video in videos:
        assert video.shape == (3, 32, 32, 3) and video.dtype == np.uint8
        assert np.array_equal(video[0], video[1]) and np.array_equal(video[0], video[2])
    assert any(not np.array_equal(v[0], still) for v in videos)
    assert len({v.tobytes() for v in videos}) == 4  # different choices, different clips


def test_augmented_pipeline_shapes_and_determinism(dataset: Path):
    a = by_row(load(dataset, AUGMENTED))
    b = by_row(load(dataset, dataclasses.replace(AUGMENTED, erase_prob=0.0), batch_size=2))
    plain = by_row(load(dataset, BASE))
    assert set(a) == set(b) == set(plain) and len(a) == ROWS
    for row in a:
        assert a[row]["video"].shape == (3, 4, 64, 64) and a[row]["audio"].shape == (1, 256, 128)
        assert torch.isfinite(a[row]["video"]).all()
        # RandAugment and gain are functions of (seed, epoch, row): batch size and erasing change nothing
        # outside the erased box
        keep = (a[row]["video"] == b[row]["video"]).all(dim=(0, 1))  # [H, W]: untouched in every frame
        assert 0 < (~keep).float().mean() < 0.5
        rows_touched, cols_touched = (~keep).any(1).nonzero(), (~keep).any(0).nonzero()
        box = (~keep)[rows_touched.min():rows_touched.max() + 1, cols_touched.min():cols_touched.max() + 1]
        assert box.all()  # one rectangle, the same in every frame
        torch.testing.assert_close(a[row]["audio"], b[row]["audio"], rtol=0, atol=0)
        assert not torch.equal(b[row]["video"], plain[row]["video"])  # RandAugment acted
        assert not torch.equal(a[row]["audio"], plain[row]["audio"])  # the gain acted


def test_audio_gain_shifts_the_log_mel_by_twice_its_log(dataset: Path):
    spec = dataclasses.replace(BASE, audio_gain=True)
    gained, plain = by_row(load(dataset, spec)), by_row(load(dataset, BASE))
    info = VideoInfo("vp9", 12, 64, 64)
    for row in gained:
        gain = sample_clip(info, spec, clip_rng(5, 0, row)).audio_gain
        shift = (gained[row]["audio"] - plain[row]["audio"]) * spec.audio_std  # back to ln units
        ln = plain[row]["audio"] * spec.audio_std + spec.audio_mean
        # clear of the log floor, and not the zero padding after a short clip (never scaled)
        voiced = (ln > -10) & (ln.abs() > 1e-3)
        assert voiced.float().mean() > 0.1
        torch.testing.assert_close(shift[voiced], torch.full_like(shift[voiced], 2 * math.log(gain)),
                                   rtol=0, atol=2e-3)


def test_resumed_epoch_sees_the_same_augmentation(dataset: Path):
    spec = dataclasses.replace(AUGMENTED, erase_prob=0.0)  # the erased noise is DALI's, not the source's
    full = load(dataset, spec)
    _ = list(full)
    second = by_row(full)
    resumed = by_row(load(dataset, spec, start_epoch=1))
    for row in second:
        torch.testing.assert_close(second[row]["video"], resumed[row]["video"], rtol=0, atol=0)
        torch.testing.assert_close(second[row]["audio"], resumed[row]["audio"], rtol=0, atol=0)
