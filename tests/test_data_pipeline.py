"""The DALI loader on CPU: pairing, shapes, determinism, resumption, augmentation, test views, sharding,
last batch, decoding accuracy, errors.

Clips come from dali_pipelines.synthetic with one class per row, so every clip's audio pitch and
video background colour identify its manifest row. GPU-only paths (NVDEC) skip without CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from avfmae.config import get_config
from dali_pipelines import (
    MODEL_GEOMETRY,
    PAD_INDEX,
    ClipSpec,
    LastBatchPolicy,
    ManifestError,
    UnsupportedCodecError,
    build_loader,
    build_pipeline,
    decoders,
    denormalize_video,
    kaldi_fbank,
    probe_video,
    read_manifest,
    sample_frame_indices,
)
from dali_pipelines.augment import RandAugmentSpec
from dali_pipelines.baseline import audio_tensor, build_baseline_loader
from dali_pipelines.decoders import torchcodec_missing
from dali_pipelines.source import (
    ClipSource,
    EvalView,
    batches_per_epoch,
    clip_rng,
    epoch_order,
    sample_clip,
    sample_crop_window,
    shard_batches,
)
from dali_pipelines.spec import LoaderOptions
from dali_pipelines.synthetic import class_background, encode_video, generate_dataset
from tests.helpers.references import psnr

ROWS = 8
SMALL = ClipSpec(num_frames=8, frame_stride=2, image_size=64)
needs_torchcodec = pytest.mark.skipif(torchcodec_missing() is not None, reason=str(torchcodec_missing()))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: DALI's mixed (NVDEC) video decoder has no CPU fallback")


def load(manifest, batch_size=3, train=False, spec=SMALL, **kw):
    return build_loader(manifest, batch_size, train, device="cpu", num_threads=2, spec=spec, **kw)


def epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def by_row(batches) -> dict[int, dict[str, torch.Tensor]]:
    """Samples keyed by manifest row."""
    return {int(row): {k: b[k][i] for k in ("video", "audio", "label")}
            for b in batches for i, row in enumerate(b["index"].tolist())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 rows, one class each: pitch and background colour identify the row. 24 frames of 64x64."""
    return generate_dataset(tmp_path_factory.mktemp("rows"), clips=ROWS, classes=ROWS, num_frames=24, size=64)


@pytest.fixture(scope="module")
def row_pitch_bins(dataset: Path) -> np.ndarray:
    """The loudest mel bin of each row's wav under the Kaldi reference."""
    bins = []
    for clip in read_manifest(dataset).clips:
        wave, _ = sf.read(clip.audio, dtype="float64")
        bins.append(int(kaldi_fbank(torch.from_numpy(wave)).mean(0).argmax()))
    assert len(set(bins)) == ROWS  # the rows are distinguishable by pitch
    return np.array(bins)


def rows_from_audio(audio: torch.Tensor, pitch_bins: np.ndarray) -> list[int]:
    # zero padding is one constant over all bins, so it cannot move the time-averaged peak
    peaks = audio[:, 0].mean(1).argmax(-1)
    return [int(np.abs(pitch_bins - int(p)).argmin()) for p in peaks]


def rows_from_video(video: torch.Tensor, spec: ClipSpec = SMALL) -> list[int]:
    """Vote over pixels: nearest colour among the face colours and every row's background."""
    palette = torch.tensor(np.stack([(224, 172, 140), (40, 30, 30), (120, 30, 40)]
                                    + [class_background(r, ROWS) for r in range(ROWS)]), dtype=torch.float32)
    pixels = denormalize_video(video, spec).permute(0, 2, 3, 4, 1).reshape(video.shape[0], -1, 3)
    nearest = torch.cdist(pixels, palette[None].expand(video.shape[0], -1, -1)).argmin(-1) - 3
    return [int(torch.bincount(n[n >= 0], minlength=ROWS).argmax()) for n in nearest]


# --- shapes, pairing, determinism ----------------------------------------------------------------


def test_default_spec_gives_the_model_shapes(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, clips=2, classes=2, num_frames=20, size=176)
    for train in (True, False):
        batch = next(iter(build_loader(manifest, 2, train, device="cpu", num_threads=2)))
        assert batch["video"].shape == (2, 3, 16, 160, 160) and batch["video"].dtype == torch.float32
        assert batch["audio"].shape == (2, 1, 256, 128) and batch["audio"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        assert batch["video"].is_contiguous() and torch.isfinite(batch["video"]).all()
        # ImageNet-normalised pixels stay within [(0 - 0.485) / 0.229, (1 - 0.406) / 0.225]
        assert batch["video"].min() >= -2.2 and batch["video"].max() <= 2.7


@pytest.mark.parametrize("train", [False, True], ids=["ordered", "shuffled"])
def test_audio_video_label_and_index_stay_paired(dataset: Path, row_pitch_bins, train: bool) -> None:
    seen = []
    for shard in range(2):
        loader = load(dataset, batch_size=2, train=train, seed=5, shard_id=shard, num_shards=2)
        for batch in loader:
            index = batch["index"].tolist()
            assert batch["label"].tolist() == index  # one class per row
            assert rows_from_audio(batch["audio"], row_pitch_bins) == index
            assert rows_from_video(batch["video"]) == index
            seen += index
    assert sorted(seen) == list(range(ROWS))
    if train:
        assert seen != sorted(seen)


def test_same_seed_same_batches_new_epoch_new_order(dataset: Path) -> None:
    a, b = load(dataset, train=True, seed=3), load(dataset, train=True, seed=3)
    first_a, first_b = epoch(a), epoch(b)
    second_a, second_b = epoch(a), epoch(b)
    for x, y in zip(first_a + second_a, first_b + second_b, strict=True):
        for key in ("video", "audio", "label", "index"):
            assert torch.equal(x[key], y[key]), key
    order = [torch.cat([batch["index"] for batch in e]).tolist() for e in (first_a, second_a)]
    assert order[0] != order[1]
    other = torch.cat([batch["index"] for batch in epoch(load(dataset, train=True, seed=4))]).tolist()
    assert other != order[0]


def test_resumed_run_sees_exactly_the_uninterrupted_epochs(dataset: Path) -> None:
    uninterrupted = load(dataset, train=True, seed=3)
    epochs = [epoch(uninterrupted) for _ in range(3)]
    resumed = build_loader(dataset, 3, True, device="cpu", num_threads=1, spec=SMALL, seed=3, start_epoch=1)
    for expected in epochs[1:]:  # the epoch resumed at, and the one after it
        got = epoch(resumed)
        assert len(got) == len(expected)
        for x, y in zip(got, expected, strict=True):
            for key in ("video", "audio", "label", "index"):
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6, msg=key)


class FirstBatch:  # DALI's BatchInfo of epoch 0, iteration 0
    epoch_idx, iteration = 0, 0


@pytest.mark.parametrize("train, decoder", [(True, "dali"), (False, "dali"), (True, "torchcodec")])
def test_source_feeds_its_declared_outputs(dataset: Path, train: bool, decoder: str) -> None:
    """Every output the source declares arrives in its place with its dtype; the graph reads them by name."""
    if decoder == "torchcodec" and (why := torchcodec_missing()):
        pytest.skip(why)
    spec = dataclasses.replace(SMALL, rand_augment=RandAugmentSpec.parse("rand-m7-n2"), erase_prob=0.5,
                               audio_gain=True)
    source = ClipSource(read_manifest(dataset), 3, train, LastBatchPolicy.DROP,
                        LoaderOptions(device="cpu", spec=spec, video_decoder=decoder))
    names = [out.name for out in source.outputs]
    media = ["video", "audio"] + ["frame_indices"] * (decoder == "dali")
    choices = (["crop_start", "crop_shape", "flip", "audio_position", "rand_augment", "erase_anchor", "erase_shape",
                "audio_gain"] if train else ["crop_position"])
    assert names == media + choices + ["label", "index"]
    fed = source(FirstBatch())
    assert len(fed) == len(source.outputs) == source.num_outputs
    for out, column in zip(source.outputs, fed, strict=True):
        assert len(column) == 3 and all(value.dtype == out.dtype for value in column), out
    by_name = dict(zip(names, fed))
    assert [int(i) for i in by_name["index"]] == source.epoch_batches(0)[0][0].tolist()
    assert [int(x) for x in by_name["label"]] == [int(i) for i in by_name["index"]]  # one class per row
    if decoder == "torchcodec":
        assert source.outputs[0].layout == "FHWC" and by_name["video"][0].shape == (SMALL.num_frames, 64, 64, 3)
    if train:
        assert all(v.shape == (2,) for v in by_name["crop_shape"]) and by_name["rand_augment"][0].shape == (3, 2)


def test_mid_epoch_resume_starts_at_the_batch_without_decoding_the_skipped_ones(dataset: Path, monkeypatch) -> None:
    uninterrupted = load(dataset, batch_size=2, train=True, seed=3)
    epochs = [epoch(uninterrupted) for _ in range(3)]
    fed: list[tuple[int, int]] = []  # (epoch, row) of every clip the source reads and hands DALI to decode
    read = ClipSource._clip_inputs

    def counting(self, row: int, epoch_: int):
        fed.append((epoch_, row))
        return read(self, row, epoch_)

    monkeypatch.setattr(ClipSource, "_clip_inputs", counting)
    skip = 3  # of 4 batches
    resumed = load(dataset, batch_size=2, train=True, seed=3, start_epoch=1, start_batch=skip)
    got = [epoch(resumed), epoch(resumed)]
    assert [len(e) for e in got] == [len(epochs[1]) - skip, len(epochs[2])]
    for x, y in zip(got[0] + got[1], epochs[1][skip:] + epochs[2], strict=True):
        for key in ("video", "audio", "label", "index"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6, msg=key)
    # epoch 1 (resumed at batch 3) fed only the rows of its last batch; the skipped rows were never read
    assert [row for e, row in fed if e == 1] == epochs[1][skip]["index"].tolist()
    assert sorted(row for e, row in fed if e == 2) == sorted(torch.cat([b["index"] for b in epochs[2]]).tolist())


@pytest.mark.parametrize("start_batch", [-1, 4, 1.0])
def test_start_batch_outside_the_epoch_is_an_error(dataset: Path, start_batch) -> None:
    with pytest.raises(ValueError, match="start_batch"):
        load(dataset, batch_size=2, train=True, start_batch=start_batch)


def test_augmentation_of_a_row_ignores_sharding_batch_size_and_threads(dataset: Path) -> None:
    whole = by_row(epoch(build_loader(dataset, 3, True, device="cpu", num_threads=1, spec=SMALL, seed=2)))
    halves = {}
    for shard in (0, 1):
        halves |= by_row(epoch(load(dataset, batch_size=2, train=True, seed=2, shard_id=shard, num_shards=2)))
    assert len(whole) == 6 and len(halves) == ROWS  # DROP: 2 batches of 3 vs 2 x 2 batches of 2
    for row, sample in whole.items():
        for key in ("video", "audio", "label"):
            torch.testing.assert_close(sample[key], halves[row][key], rtol=0, atol=1e-6, msg=f"row {row} {key}")


def smooth_still(height: int = 64, width: int = 96) -> np.ndarray:
    """A smooth, asymmetric image (codecs keep it well): red grows left to right, green top to bottom."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    blue = 128 + 100 * np.sin(x / 6) * np.cos(y / 9)
    return np.stack([x * 255 / (width - 1), y * 255 / (height - 1), blue], -1).round().astype(np.uint8)


def test_training_crops_and_flips_follow_the_sampler_per_clip_and_epoch(tmp_path: Path) -> None:
    still = smooth_still()  # 96 x 64: a swapped height/width would show
    manifest = generate_dataset(tmp_path, clips=4, classes=2, num_frames=12, size=64)
    for clip in read_manifest(manifest).clips:
        clip.video.write_bytes(encode_video(np.repeat(still[None], 12, axis=0), quality=4))
    info = probe_video(read_manifest(manifest).clips[0].video.read_bytes())
    image = torch.from_numpy(still).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
    loader = load(manifest, batch_size=4, train=True, seed=1)
    choices, videos = set(), {}
    for ep in range(2):
        for batch in loader:
            video = batch["video"]
            # a still clip stays still: one crop and flip for every frame of a clip (up to codec noise)
            assert (video - video[:, :, :1]).abs().max() < 0.1
            for i, row in enumerate(batch["index"].tolist()):
                aug = sample_clip(info, SMALL, clip_rng(1, ep, row))
                top, left, h, w = aug.crop
                expected = F.interpolate(image[..., top:top + h, left:left + w], size=(64, 64), mode="bilinear",
                                         antialias=True, align_corners=False)[0, :, None]  # [3, 1, S, S]
                expected = expected.flip(-1) if aug.flip else expected
                pixels = denormalize_video(video[i], SMALL)
                assert psnr(pixels, expected) > 40 and psnr(pixels, expected.flip(-1)) < 25
                choices.add((aug.crop, aug.flip))
                videos[ep, row] = video[i]
    assert len(choices) == 8  # every clip, every epoch: its own window
    assert {flip for _, flip in choices} == {False, True}
    for row in range(4):
        assert not torch.allclose(videos[0, row], videos[1, row], atol=0.1)


def test_audio_windows_eval_centred_train_at_the_sampled_position(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, clips=2, classes=2, num_frames=8, size=64, audio_seconds=4.0)
    spec = ClipSpec(num_frames=4, frame_stride=1, image_size=64)
    clips = read_manifest(manifest).clips
    fbanks = []
    for clip in clips:
        wave, _ = sf.read(clip.audio, dtype="float64")
        fbanks.append(kaldi_fbank(torch.from_numpy(wave - wave.mean())).float())  # 398 frames
    room = fbanks[0].shape[0] - 256

    def reference(row: int, start: int) -> torch.Tensor:
        return (fbanks[row][start:start + 256] - spec.audio_mean) / spec.audio_std

    eval_audio = next(iter(load(manifest, batch_size=2, spec=spec)))["audio"]
    assert (eval_audio[0, 0] - reference(0, room // 2))[:, 16:].abs().max() < 0.01  # bins above ~300 Hz
    info = probe_video(clips[0].video.read_bytes())
    loader = load(manifest, batch_size=2, train=True, seed=5, spec=spec)
    starts = set()
    for ep in range(2):
        batch = next(iter(loader))
        for i, row in enumerate(batch["index"].tolist()):
            start = min(math.floor(sample_clip(info, spec, clip_rng(5, ep, row)).audio_position * (room + 1)), room)
            assert (batch["audio"][i, 0] - reference(row, start))[:, 16:].abs().max() < 0.01
            starts.add(start)
    assert len(starts) == 4  # a new window per clip and per epoch


@pytest.mark.parametrize("position, start", [(0.0, 0), (0.3, 1), (0.5, 2), (float(np.nextafter(1.0, 0.0)), 3)])
def test_audio_window_positions_reach_every_start(position: float, start: int) -> None:
    """room + 1 windows fit; floor(position * room) never drew the last (the one ending at the clip's end)."""
    spec = ClipSpec(audio_frames=256)
    samples = 258 * spec.window_step + spec.window_length  # 259 frames: room 3
    wave = torch.randn(samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fbank = kaldi_fbank(wave - wave.mean(), spec.sample_rate, spec.audio_bins)
    assert fbank.shape[0] == 259
    expected = (fbank[start:start + 256] - spec.audio_mean) / spec.audio_std
    got = audio_tensor(wave, spec, position)[0]
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-4, rtol=1e-4)


# --- test views (several clips x crops) -----------------------------------------------------------


def test_view_0_of_1_x_0_of_1_is_the_default_evaluation(dataset: Path) -> None:
    default = epoch(load(dataset, batch_size=3))
    for view in [(0, 1, 0, 1), EvalView()]:
        for x, y in zip(epoch(load(dataset, batch_size=3, view=view)), default, strict=True):
            for key in ("video", "audio", "label", "index"):
                assert torch.equal(x[key], y[key]), (view, key)


def test_view_windows_are_evenly_spaced() -> None:
    assert sample_frame_indices(100, 16, 4, None, 0, 2).tolist() == list(range(0, 61, 4))  # room 39
    assert sample_frame_indices(100, 16, 4, None, 1, 2).tolist() == list(range(39, 100, 4))  # ends at 99
    assert [int(sample_frame_indices(100, 16, 4, None, k, 3)[0]) for k in range(3)] == [0, 19, 39]
    assert sample_frame_indices(100, 16, 4, None, 0, 1).tolist() == sample_frame_indices(100, 16, 4, None).tolist()
    assert sample_frame_indices(10, 4, 4, None, 1, 2).tolist() == [0, 4, 8, 2]  # span > clip: start 0, looped


def test_view_clips_decode_their_windows_and_share_the_centred_audio(dataset: Path) -> None:
    views = [next(iter(load(dataset, batch_size=4, view=(k, 2, 0, 1)))) for k in range(2)]
    for i, row in enumerate(views[0]["index"].tolist()):
        with av.open(str(read_manifest(dataset).clips[row].video)) as container:
            frames = np.stack([yuv420p_to_rgb(f) for f in container.decode(video=0)])
        pixels = [denormalize_video(v["video"][i], SMALL) for v in views]
        for k in range(2):
            indices = sample_frame_indices(len(frames), SMALL.num_frames, SMALL.frame_stride, None, k, 2)
            assert indices[0] == (0, 9)[k]  # 24 frames, span 15: the first and the last window
            reference = torch.from_numpy(frames[indices]).permute(3, 0, 1, 2)
            assert psnr(pixels[k], reference) >= 40.0
            assert psnr(pixels[1 - k], reference) < 30.0  # the other window shows other frames
    assert torch.equal(views[0]["audio"], views[1]["audio"])
    assert torch.equal(views[0]["index"], views[1]["index"]) and torch.equal(views[0]["label"], views[1]["label"])


@pytest.mark.parametrize("height, width", [(64, 96), (96, 64)], ids=["wide", "tall"])
def test_view_crops_match_a_torch_crop_of_the_resized_frames(tmp_path: Path, height: int, width: int) -> None:
    still = smooth_still(height, width)
    manifest = generate_dataset(tmp_path, clips=2, classes=2, num_frames=6, size=64)
    for clip in read_manifest(manifest).clips:
        clip.video.write_bytes(encode_video(np.repeat(still[None], 6, axis=0), quality=4))
    spec = ClipSpec(num_frames=2, frame_stride=1, image_size=32)
    image = torch.from_numpy(still).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
    resized = F.interpolate(image, size=(height // 2, width // 2), mode="bilinear", antialias=True,
                            align_corners=False)[0, :, None]  # shorter side 32, longer 48: [3, 1, h, w]
    # three crops along the longer side: 16 pixels left over, offsets 0, 8 (the centre crop), 16
    crops = [resized[..., o:o + 32, :32] if height > width else resized[..., :32, o:o + 32] for o in (0, 8, 16)]
    for view, expected in [((0, 1, 0, 3), 0), ((0, 1, 1, 3), 1), ((0, 1, 2, 3), 2), ((0, 1, 1, 2), 2),
                           ((0, 1, 0, 1), 1)]:
        pixels = denormalize_video(next(iter(load(manifest, batch_size=2, spec=spec, view=view)))["video"], spec)
        for k, crop in enumerate(crops):
            if k == expected:
                assert psnr(pixels, crop.expand_as(pixels)) > 40, view
            else:
                assert psnr(pixels, crop.expand_as(pixels)) < 30, (view, k)


# --- decoding accuracy -----------------------------------------------------------------------------


def yuv420p_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """BT.601 limited-range YUV→RGB with bilinear (centred) chroma upsampling, as DALI converts.

    PyAV's own ``to_ndarray("rgb24")`` (swscale defaults) upsamples chroma more coarsely and lands
    3-5 dB lower on these sharp synthetic colour edges; the pixels it decodes (Y, U, V) are the same.
    """
    h, w = frame.height, frame.width
    planes = frame.to_ndarray()  # yuv420p: [h * 3 / 2, w]
    y = torch.from_numpy(planes[:h].astype(np.float32))
    uv = torch.from_numpy(planes[h:].reshape(2, h // 2, w // 2).astype(np.float32))
    u, v = torch.nn.functional.interpolate(uv[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    y, u, v = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
    rgb = torch.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    return rgb.round().clamp(0, 255).numpy()


def test_decoded_frames_match_pyav_above_40db(dataset: Path) -> None:
    spec = ClipSpec(num_frames=8, frame_stride=4, image_size=64)  # 29-frame span: loops the 24-frame clips
    batch = next(iter(load(dataset, batch_size=4, spec=spec)))
    for i, row in enumerate(batch["index"].tolist()):
        with av.open(str(read_manifest(dataset).clips[row].video)) as container:
            frames = np.stack([yuv420p_to_rgb(f) for f in container.decode(video=0)])
        indices = sample_frame_indices(len(frames), spec.num_frames, spec.frame_stride, None)
        assert indices.tolist() == [0, 4, 8, 12, 16, 20, 0, 4]
        reference = torch.from_numpy(frames[indices]).permute(3, 0, 1, 2)
        mse = float(((denormalize_video(batch["video"][i], spec) - reference) ** 2).mean())
        assert 10 * math.log10(255**2 / mse) >= 40.0


def test_crop_window_fallback_is_the_centred_crop_of_clamped_aspect() -> None:
    rng = np.random.default_rng(0)
    # a whole-frame area at aspect >= 2 never fits a square frame: centred 100 x 50 (w = 2 h)
    assert sample_crop_window(100, 100, (1.0, 1.0), (2.0, 3.0), rng) == (25, 0, 50, 100)
    # nor does it fit a 100-wide, 400-tall frame at aspect 3/4..4/3: full width, h = 100 / (3/4)
    assert sample_crop_window(400, 100, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (133, 0, 133, 100)
    with pytest.raises(ValueError, match="height"):
        sample_crop_window(0, 100, (0.5, 1.0), (1.0, 1.0), rng)


@given(height=st.integers(1, 300), width=st.integers(1, 300), area=st.tuples(st.floats(0.05, 1), st.floats(0.05, 1)),
       aspect=st.tuples(st.floats(0.3, 3), st.floats(0.3, 3)), seed=st.integers(0, 2**32))
def test_crop_window_is_inside_the_frame_within_bounds_and_seeded(height, width, area, aspect, seed) -> None:
    area, aspect = tuple(sorted(area)), tuple(sorted(aspect))
    top, left, h, w = sample_crop_window(height, width, area, aspect, np.random.default_rng(seed))
    assert sample_crop_window(height, width, area, aspect, np.random.default_rng(seed)) == (top, left, h, w)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h >= 1 and w >= 1
    centred_fallback = (top, left) == ((height - h) // 2, (width - w) // 2) and (h == height or w == width)
    # w, h are rounded from sqrt(A r), sqrt(A / r): some area A and aspect r within bounds produced them
    area_ok = (w - 0.5) * (h - 0.5) <= area[1] * height * width and (w + 0.5) * (h + 0.5) >= area[0] * height * width
    aspect_ok = (w - 0.5) / (h + 0.5) <= aspect[1] and (w + 0.5) / (h - 0.5) >= aspect[0]
    assert centred_fallback or (area_ok and aspect_ok)


def test_crop_window_distribution() -> None:
    rng = np.random.default_rng(1)
    windows = np.array([sample_crop_window(1000, 1000, (0.44, 1.0), (3 / 4, 4 / 3), rng) for _ in range(2000)])
    area = windows[:, 2] * windows[:, 3] / 1e6
    log_aspect = np.log(windows[:, 3] / windows[:, 2])
    # Tries are uniform in area and log-uniform in aspect; those that do not fit (a r > 1 or a / r > 1)
    # are redrawn, so the accepted area is uniform on [0.44, exp(-|log r|)] — its mean by quadrature:
    log_r = np.linspace(math.log(3 / 4), math.log(4 / 3), 10001)
    top = np.exp(-np.abs(log_r))
    expected = ((top**2 - 0.44**2) / 2).sum() / (top - 0.44).sum()
    assert area.min() < 0.46 and area.max() > 0.98 and abs(area.mean() - expected) < 0.01
    assert log_aspect.min() < math.log(0.77) and log_aspect.max() > math.log(1.3)
    assert abs(log_aspect.mean()) < 0.02  # log-uniform in aspect: symmetric about 1
    centres = windows[:, :2] + windows[:, 2:] / 2
    assert abs(centres.mean() - 500) < 10  # placed uniformly


def test_clip_choices_are_a_function_of_seed_epoch_and_row() -> None:
    from dali_pipelines import VideoInfo

    info = VideoInfo("vp9", 100, 96, 64)
    spec = ClipSpec(num_frames=8, frame_stride=2, image_size=64)

    def draw(seed, ep, row):
        aug = sample_clip(info, spec, clip_rng(seed, ep, row))
        return aug.frames.tolist(), aug.crop, aug.flip, aug.audio_position

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({repr(draw(*key)) for key in [(1, 2, 3), (0, 2, 3), (1, 0, 3), (1, 2, 0)]}) == 4
    no_flip = ClipSpec(num_frames=8, frame_stride=2, image_size=64, flip=False)
    flips = [sample_clip(info, no_flip, clip_rng(0, 0, row)) for row in range(20)]
    assert not any(a.flip for a in flips) and any(draw(0, 0, row)[2] for row in range(20))
    evaluation = sample_clip(info, spec, None)
    assert evaluation.crop is None and not evaluation.flip and evaluation.audio_position == 0.5
    assert evaluation.frames.tolist() == sample_frame_indices(100, 8, 2, None).tolist()
    assert evaluation.crop_position == 0.5
    last = sample_clip(info, spec, None, EvalView(1, 2, 1, 2))  # last window, last crop, same audio
    assert last.frames[-1] == 99 and last.crop_position == 1.0 and last.audio_position == 0.5
    assert sample_clip(info, spec, None, EvalView(0, 2, 0, 2)).crop_position == 0.0


def test_frame_sampling() -> None:
    assert sample_frame_indices(100, 16, 4, None).tolist() == list(range(19, 80, 4))  # centred
    assert sample_frame_indices(10, 4, 4, None).tolist() == [0, 4, 8, 2]  # looped
    rng = np.random.default_rng(0)
    starts = {int(sample_frame_indices(100, 16, 4, rng)[0]) for _ in range(300)}
    assert min(starts) >= 0 and max(starts) <= 100 - 61 and len(starts) > 30
    assert sample_frame_indices(100, 16, 4, rng).dtype == np.int32


# --- sharding and the last batch ------------------------------------------------------------------


@given(n=st.integers(1, 40), shards=st.integers(1, 4), batch=st.integers(1, 5), epoch_seed=st.integers(0, 3))
def test_shard_batches_cover_the_epoch(n: int, shards: int, batch: int, epoch_seed: int) -> None:
    order = epoch_order(n, epoch_seed, seed=7, shuffle=True)
    for policy in LastBatchPolicy:
        per_shard = [shard_batches(order, s, shards, batch, policy) for s in range(shards)]
        for s, batches in enumerate(per_shard):
            assert len(batches) == batches_per_epoch(n, s, shards, batch, policy)
        rows = np.concatenate([r for b in per_shard for r, _ in b] or [np.zeros(0, int)])
        real = np.concatenate([r[~p] for b in per_shard for r, p in b] or [np.zeros(0, int)])
        if policy is LastBatchPolicy.PARTIAL:
            assert sorted(rows.tolist()) == list(range(n))
        else:
            assert len({len(b) for b in per_shard}) == 1  # every rank runs the same number of steps
            assert all(len(r) == batch for b in per_shard for r, _ in b)
        if policy is LastBatchPolicy.FILL:
            assert sorted(real.tolist()) == list(range(n))
        if policy is LastBatchPolicy.DROP:
            assert len(rows) == shards * batch * (-(-n // shards) // batch)
            assert len(set(rows.tolist())) == min(n, len(rows))


def test_two_shards_cover_the_manifest_once(dataset: Path) -> None:
    for policy in (LastBatchPolicy.FILL, LastBatchPolicy.PARTIAL):
        loaders = [load(dataset, batch_size=3, num_shards=2, shard_id=s, last_batch_policy=policy)
                   for s in (0, 1)]
        indices = [torch.cat([b["index"] for b in epoch(ld)]).tolist() for ld in loaders]
        assert sorted(i for ix in indices for i in ix if i != PAD_INDEX) == list(range(ROWS))
        assert len(loaders[0]) == len(loaders[1]) == 2
    train = [load(dataset, batch_size=2, train=True, num_shards=2, shard_id=s, seed=9) for s in (0, 1)]
    steps = [epoch(ld) for ld in train]
    assert len(steps[0]) == len(steps[1]) == len(train[0]) == 2
    rows = [set(torch.cat([b["index"] for b in s]).tolist()) for s in steps]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(ROWS))


@pytest.mark.parametrize(
    "policy, sizes, last_index",
    [(LastBatchPolicy.DROP, [3, 3], [3, 4, 5]),
     (LastBatchPolicy.PARTIAL, [3, 3, 1], [6]),
     (LastBatchPolicy.FILL, [3, 3, 3], [6, PAD_INDEX, PAD_INDEX])],
)
def test_last_batch_policy(dataset: Path, policy, sizes, last_index) -> None:
    manifest = read_manifest(dataset)
    seven = type(manifest)(manifest.path, manifest.clips[:7], manifest.label_columns, manifest.task)
    loader = load(seven, batch_size=3, last_batch_policy=policy)
    for _ in range(2):  # and again next epoch
        batches = epoch(loader)
        assert len(loader) == len(batches) and [len(b["index"]) for b in batches] == sizes
        assert batches[-1]["index"].tolist() == last_index
        assert batches[-1]["video"].shape[0] == batches[-1]["audio"].shape[0] == sizes[-1]


def test_default_policies() -> None:
    from dali_pipelines import default_policy

    assert default_policy(True, 4) is LastBatchPolicy.DROP
    assert default_policy(False, 4) is LastBatchPolicy.FILL
    assert default_policy(False, 1) is LastBatchPolicy.PARTIAL


def test_regression_and_unlabelled_labels(dataset: Path, tmp_path: Path) -> None:
    clips = read_manifest(dataset).clips[:3]
    regression = tmp_path / "reg.csv"
    regression.write_text("video,audio,label_v,label_a\n" + "".join(
        f"{c.video},{c.audio},{i / 2},{-i}\n" for i, c in enumerate(clips)))
    batch = next(iter(load(regression, batch_size=3)))
    assert batch["label"].dtype == torch.float32
    torch.testing.assert_close(batch["label"], torch.tensor([[0.0, 0.0], [0.5, -1.0], [1.0, -2.0]]))
    unlabelled = tmp_path / "pre.csv"
    unlabelled.write_text("video,audio\n" + "".join(f"{c.video},{c.audio}\n" for c in clips))
    assert next(iter(load(unlabelled, batch_size=3)))["label"].tolist() == [-1, -1, -1]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"batch_size": 0}, ValueError, "batch_size"),
     ({"num_threads": 0}, ValueError, "num_threads"),
     ({"shard_id": 2, "num_shards": 2}, ValueError, "shard_id"),
     ({"num_shards": 0}, ValueError, "num_shards"),
     ({"seed": -1}, ValueError, "seed"),
     ({"start_epoch": -1}, ValueError, "start_epoch"),
     ({"device": "tpu"}, ValueError, "device"),
     ({"spec": {"num_frames": 8}}, TypeError, "spec"),
     ({"last_batch_policy": "drop"}, TypeError, "last_batch_policy"),
     ({"batch_size": 9, "train": True}, ValueError, "yields no batch"),
     ({"view": (0, 1, 0, 1), "train": True}, ValueError, "view=.*evaluation"),
     ({"view": (2, 2, 0, 1)}, ValueError, "view: .*clip_index"),
     ({"view": (0, 0, 0, 1)}, ValueError, "view: .*num_clips"),
     ({"view": (0, 1, -1, 2)}, ValueError, "view: .*crop_index"),
     ({"view": (0, 1, 0.5, 2)}, ValueError, "view.crop_index must be an int"),
     ({"view": (0, 1)}, ValueError, "view must be"),
     ({"video_decoder": "decord"}, ValueError, "video_decoder must be one of")],
)
def test_bad_arguments(dataset: Path, kwargs, error, match) -> None:
    args = {"batch_size": 2, "train": False, "device": "cpu", "num_threads": 2, "spec": SMALL} | kwargs
    with pytest.raises(error, match=match):
        build_loader(dataset, **args)


def test_pipeline_and_loader_share_one_options_object(dataset: Path) -> None:
    """build_pipeline and build_loader read the same LoaderOptions: the same thread default, and every
    option (prefetch depth included) reaches the pipeline through either; keywords replace its fields."""
    options = LoaderOptions(device="cpu", spec=SMALL, prefetch_queue_depth=3, seed=5)
    pipe, source = build_pipeline(dataset, 2, False, options)
    loader = build_loader(dataset, 2, False, options, num_threads=1)
    assert options.threads == min(4, os.cpu_count())
    assert (pipe.num_threads, pipe.prefetch_queue_depth, source.seed) == (options.threads, 3, 5)
    assert (loader._pipes[0].num_threads, loader._pipes[0].prefetch_queue_depth, loader.source.seed) == (1, 3, 5)
    assert options.num_threads is None  # the keywords made a new options object
    with pytest.raises(TypeError, match=r"unknown loader option\(s\) \['num_thread'\]; LoaderOptions has"):
        build_loader(dataset, 2, False, options, num_thread=2)
    with pytest.raises(TypeError, match="options must be a LoaderOptions"):
        build_loader(dataset, 2, False, {"device": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_gpu_without_cuda_is_a_clear_error(dataset: Path) -> None:
    with pytest.raises(ValueError, match="needs CUDA"):
        build_loader(dataset, 2, False, device="gpu")


@pytest.mark.parametrize("field, value", [("num_frames", 0), ("image_size", 1.5), ("audio_std", 0.0),
                                          ("crop_area", (0.5, 0.2)), ("video_std", (1.0, 1.0)),
                                          ("sample_rate", 50)])  # no sample per 10 ms fbank step
def test_bad_clip_spec(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        ClipSpec(**{field: value})


@pytest.mark.parametrize("fraction", ["0.1", 1.5, True])
def test_bad_clip_fraction_is_named(fraction) -> None:
    with pytest.raises(ValueError, match=f"max_bad_clip_fraction must be a number in \\[0, 1\\], got {fraction!r}"):
        LoaderOptions(device="cpu", max_bad_clip_fraction=fraction)


def test_clip_spec_for_model_takes_the_model_geometry() -> None:
    cfg = get_config("tiny", num_frames=8, audio_frames=128)
    spec = ClipSpec.for_model(cfg, frame_stride=2, flip=False)
    assert [getattr(spec, name) for name in MODEL_GEOMETRY] == [8, 160, 128, 128]
    assert (spec.frame_stride, spec.flip) == (2, False)
    # the model's default geometry is the spec's (its one owner), e.g. 16 x 160^2 video, 256 x 128 fbank
    assert [getattr(get_config("base"), name) for name in MODEL_GEOMETRY] == [16, 160, 256, 128]
    assert [getattr(ClipSpec(), name) for name in MODEL_GEOMETRY] == [16, 160, 256, 128]
    with pytest.raises(ValueError, match="image_size.*from the model config"):
        ClipSpec.for_model(cfg, image_size=64)


def test_h264_on_cpu_names_the_file_and_the_fix(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, clips=2, classes=2, num_frames=8, size=64, codec="h264")
    with pytest.raises(UnsupportedCodecError) as info:
        load(manifest, batch_size=2)
    message = str(info.value)
    assert "clip_0000.mp4" in message and "'h264'" in message
    assert f"python -m dali_pipelines.transcode {manifest}" in message and "device='gpu'" in message
    assert "video_decoder='torchcodec'" in message


@needs_torchcodec
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchcodec_decoding_feeds_the_same_graph(dataset: Path, train: bool) -> None:
    # VP9, which both decode: the same clips, frames, crops, flips and audio, to the decoders' rounding
    # (FFmpeg's swscale and DALI convert YUV to RGB differently: about 2 levels on average, more at chroma
    # edges; another clip differs by > 25 levels, a mirrored one by > 4)
    dali = epoch(load(dataset, batch_size=4, train=train, seed=2))
    codec = epoch(load(dataset, batch_size=4, train=train, seed=2, video_decoder="torchcodec"))
    assert len(dali) == len(codec) == 2
    for x, y in zip(dali, codec, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["audio"], y["audio"])
        ours, theirs = denormalize_video(x["video"], SMALL), denormalize_video(y["video"], SMALL)
        for a, b in zip(ours, theirs, strict=True):
            assert (a - b).abs().mean() < 3.5 and (a - b).abs().mean() < (a.flip(-1) - b).abs().mean()


@needs_torchcodec
def test_torchcodec_decoding_threads_run_torch_single_threaded(dataset: Path) -> None:
    # torch's intra-op threads belong to the calling thread: left at the default, each decoding thread's
    # OpenMP workers spin beside DALI's (5x the CPU time per clip); the trainer's own setting stays
    threads = torch.get_num_threads()
    loader = load(dataset, batch_size=4, train=True, video_decoder="torchcodec")  # 2 threads
    assert {loader.source._pool.submit(torch.get_num_threads).result() for _ in range(4)} == {1}
    assert torch.get_num_threads() == threads


@needs_torchcodec
def test_h264_manifest_loads_on_cpu_through_torchcodec(tmp_path: Path, monkeypatch) -> None:
    manifest = generate_dataset(tmp_path, clips=4, classes=4, num_frames=24, size=64, codec="h264")
    batches = epoch(load(manifest, batch_size=2, train=True, seed=1, video_decoder="torchcodec"))
    reference = list(build_baseline_loader(manifest, 2, True, num_workers=0, seed=1, spec=SMALL))  # PyAV
    assert len(batches) == len(reference) == 2
    for x, y in zip(batches, reference, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], x["index"])
        assert psnr(denormalize_video(x["video"], SMALL), denormalize_video(y["video"], SMALL)) > 35
    # resuming at the second batch decodes only its clips (here the decoder calls are torchcodec's own)
    decoded = []
    frames = decoders.torchcodec_frames
    monkeypatch.setattr(decoders, "torchcodec_frames", lambda d, idx: decoded.append(idx.tolist()) or frames(d, idx))
    resumed = epoch(load(manifest, batch_size=2, train=True, seed=1, video_decoder="torchcodec", start_batch=1))
    assert len(resumed) == 1 and torch.equal(resumed[0]["video"], batches[1]["video"])
    clips = read_manifest(manifest).clips
    wanted = [sample_clip(probe_video(clips[row].video.read_bytes()), SMALL, clip_rng(1, 0, row)).frames.tolist()
              for row in batches[1]["index"].tolist()]
    assert sorted(decoded[:2]) == sorted(wanted)  # first decodes: the resumed batch (later: the next epoch)


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_unreadable_media_names_the_file(dataset: Path, tmp_path: Path, kind: str) -> None:
    clip = read_manifest(dataset).clips[0]
    broken = tmp_path / ("broken.webm" if kind == "video" else "broken.wav")
    broken.write_bytes(b"\x00not media" * 100)
    video, audio = (broken, clip.audio) if kind == "video" else (clip.video, broken)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video,audio,label\n{video},{audio},0\n")
    with pytest.raises(ValueError, match=f"cannot read {kind} {broken}"):
        load(manifest, batch_size=1)


def test_missing_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        load(tmp_path / "none.csv")


def test_truncated_faststart_mp4_is_a_bad_clip(tmp_path: Path) -> None:
    """An MP4 with its index in front (-movflags +faststart) keeps declaring 64 frames when cut to 2/3
    of its bytes; check_clip must count the frames the file still holds, not trust that header."""
    from dali_pipelines.manifest import Clip
    from dali_pipelines.source import BadClipError, check_clip
    from dali_pipelines.synthetic import encode_wav, face_frames

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast", "threads": "1"}
        for frame in face_frames(0, 4, 64, 64, np.random.default_rng(0)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    intact = np.fromfile(path, np.uint8)
    assert intact.tobytes().find(b"moov") < intact.tobytes().find(b"mdat")  # the index is in front
    cut = intact[: len(intact) * 2 // 3]
    assert probe_video(cut).num_frames == 64  # the header still declares every frame
    audio = np.frombuffer(encode_wav(np.zeros(16000, np.float32), 16000), np.uint8)
    clip = Clip(path, tmp_path / "a.wav", (0.0,), 5)
    assert check_clip(intact, audio, clip, SMALL, "m.csv").num_frames == 64
    with pytest.raises(BadClipError, match=r"v.mp4: truncated video: the header declares 64 frames, the file "
                                           r"holds \d+\. Fix: .* remove line 5 of m.csv"):
        check_clip(cut, audio, clip, SMALL, "m.csv")


# --- GPU (NVDEC) -------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_gpu_loader_matches_cpu(dataset: Path) -> None:
    gpu = next(iter(build_loader(dataset, 4, False, device="gpu", spec=SMALL)))
    cpu = next(iter(load(dataset, batch_size=4)))
    assert gpu["video"].is_cuda and gpu["audio"].is_cuda and not gpu["index"].is_cuda
    assert torch.equal(gpu["index"], cpu["index"])
    mse = float(((denormalize_video(gpu["video"].cpu()) - denormalize_video(cpu["video"])) ** 2).mean())
    assert 10 * math.log10(255**2 / max(mse, 1e-12)) >= 40.0
    assert (gpu["audio"].cpu() - cpu["audio"]).abs().max() < 1e-3


@pytest.mark.gpu
@needs_cuda
def test_nvdec_decodes_h264(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path, clips=4, classes=4, num_frames=24, size=64, codec="h264")
    batches = list(build_loader(manifest, 2, True, device="gpu", spec=SMALL))
    assert len(batches) == 2 and batches[0]["video"].shape == (2, 3, 8, 64, 64)
    assert torch.isfinite(batches[0]["video"]).all()
