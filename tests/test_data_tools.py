"""Synthetic data, the transcoder and the PyAV baseline loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from dali_pipelines import (
    ClipSpec,
    ManifestError,
    build_loader,
    denormalize_video,
    probe_video,
    read_manifest,
)
from dali_pipelines.baseline import build_baseline_loader, decode_audio, torchcodec_missing
from dali_pipelines.synthetic import class_pitch, generate_dataset
from dali_pipelines.synthetic import main as synthetic_main
from dali_pipelines.transcode import main as transcode_main
from dali_pipelines.transcode import transcode_manifest
from tests.helpers.references import psnr

SMALL = ClipSpec(num_frames=8, frame_stride=2, image_size=64)


def decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_manifest_tools_synthetic_data_and_transcoder_work_without_dali(tmp_path: Path) -> None:
    code = """if True:
        import sys
        sys.modules["nvidia.dali"] = None  # as if DALI were not installed: importing it fails
        from dali_pipelines.synthetic import main
        main([sys.argv[1], "--clips", "2", "--frames", "8", "--size", "32"])
        from dali_pipelines import ClipSpec, probe_video, read_manifest
        from dali_pipelines.baseline import build_baseline_loader
        from dali_pipelines.transcode import transcode_manifest
        manifest = read_manifest(sys.argv[1] + "/manifest.csv")
        print(len(manifest), probe_video(manifest.clips[0].video.read_bytes()).codec)
        spec = ClipSpec(num_frames=4, frame_stride=2, image_size=32)
        batch = next(iter(build_baseline_loader(manifest, 2, train=False, num_workers=0, spec=spec)))
        print(list(batch["video"].shape), list(batch["audio"].shape))
        import dali_pipelines
        try:
            dali_pipelines.build_loader
        except ImportError:
            print("the loader needs DALI")
    """
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-3:] == ["2 vp9", "[2, 3, 4, 32, 32] [2, 1, 256, 128]", "the loader needs DALI"]


BLOCK_IMPORTS = """if True:
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):  # as if these were not installed: importing them fails
        def find_spec(self, name, path=None, target=None):
            if name in ("av", "soundfile", "nvidia.dali") or name.startswith(("av.", "nvidia.dali.")):
                raise ImportError(f"{name} is blocked")

    sys.meta_path.insert(0, Blocked())
"""


def test_model_and_sample_spec_import_without_dali_or_media_libraries() -> None:
    """The model's config, the reconstruction pictures and the sample spec need neither DALI nor
    PyAV/soundfile (the data extra): the geometry's owner, dali_pipelines.spec, is light."""
    code = BLOCK_IMPORTS + """
    from avfmae import build_model, get_config
    from avfmae.visualize import IMAGENET_MEAN
    from dali_pipelines import MODEL_GEOMETRY, ClipSpec
    cfg = get_config("tiny", num_frames=8, audio_frames=128)  # 4 video and 4 audio regions (IAV-CL pairs them)
    build_model("tiny", "pretrain", num_frames=8, audio_frames=128)
    print(ClipSpec.for_model(cfg).num_frames, IMAGENET_MEAN == ClipSpec().video_mean, len(MODEL_GEOMETRY))
    try:
        import dali_pipelines.source
    except ImportError as err:
        print(err)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-2:] == ["8 True 4", "av is blocked"]


def test_synthetic_cli_is_deterministic_and_class_dependent(tmp_path: Path) -> None:
    synthetic_main([str(tmp_path / "a"), "--clips", "3", "--classes", "2", "--seed", "1", "--frames", "10",
                    "--size", "48"])
    generate_dataset(tmp_path / "b", clips=3, classes=2, seed=1, num_frames=10, size=48)
    generate_dataset(tmp_path / "c", clips=3, classes=2, seed=2, num_frames=10, size=48)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["clip_0000.wav", "clip_0000.webm", "clip_0001.wav", "clip_0001.webm", "clip_0002.wav",
                     "clip_0002.webm", "manifest.csv"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "clip_0000.wav").read_bytes() != (tmp_path / "c" / "clip_0000.wav").read_bytes()
    manifest = read_manifest(tmp_path / "a" / "manifest.csv")
    assert list(manifest.labels()) == [0, 1, 0]
    info = probe_video((tmp_path / "a" / "clip_0000.webm").read_bytes())
    assert (info.codec, info.num_frames, info.width, info.height) == ("vp9", 10, 48, 48)
    # class 1's pitch is the loudest frequency of clip 1; classes differ in background colour
    wave, rate = sf.read(tmp_path / "a" / "clip_0001.wav")
    assert rate == 16000 and len(wave) == 16000 * 10 // 25
    peak_hz = np.abs(np.fft.rfft(wave)).argmax() * rate / len(wave)
    assert abs(peak_hz - class_pitch(1, 2)) < 5
    frames = [decode_all(tmp_path / "a" / f"clip_000{i}.webm") for i in range(2)]
    assert np.abs(frames[0][0, :4, :4].mean((0, 1)) - frames[1][0, :4, :4].mean((0, 1))).max() > 50


def test_transcode_makes_an_h264_dataset_cpu_readable(tmp_path: Path) -> None:
    source = generate_dataset(tmp_path / "h264", clips=3, classes=3, num_frames=16, size=64, codec="h264")
    transcode_main([str(source), str(tmp_path / "vp9"), "--workers", "2"])
    manifest = read_manifest(tmp_path / "vp9" / "manifest.csv")
    assert list(manifest.labels()) == [0, 1, 2]
    for old, new in zip(read_manifest(source).clips, manifest.clips, strict=True):
        info = probe_video(new.video.read_bytes())
        assert info.codec == "vp9" and info.num_frames == 16 and (info.width, info.height) == (64, 64)
        assert psnr(torch.from_numpy(decode_all(new.video)), torch.from_numpy(decode_all(old.video))) > 30
        assert new.audio.read_bytes() == old.audio.read_bytes()  # already 16 kHz mono wav: copied
    batches = list(build_loader(tmp_path / "vp9" / "manifest.csv", 3, False, device="cpu", spec=SMALL))
    assert batches[0]["index"].tolist() == [0, 1, 2]


def test_transcode_resamples_audio_and_keeps_regression_labels(tmp_path: Path) -> None:
    source = generate_dataset(tmp_path / "src", clips=2, classes=2, num_frames=8, size=48)
    clips = read_manifest(source).clips
    stereo_44k = tmp_path / "src" / "stereo.wav"
    t = np.arange(44100) / 44100
    sf.write(stereo_44k, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.5, 44100)
    regression = tmp_path / "src" / "reg.csv"
    regression.write_text(f"video,audio,label_v,label_a\n{clips[0].video.name},stereo.wav,0.5,-1\n"
                          f"{clips[1].video.name},{clips[1].audio.name},2,0.25\n")
    out = transcode_manifest(regression, tmp_path / "out", workers=1, progress=False)
    manifest = read_manifest(out)
    np.testing.assert_allclose(manifest.labels(), [[0.5, -1.0], [2.0, 0.25]])
    assert manifest.label_columns == ("label_v", "label_a")
    wave, rate = sf.read(manifest.clips[0].audio)
    assert rate == 16000 and wave.ndim == 1 and abs(len(wave) - 16000) < 64
    assert abs(np.abs(np.fft.rfft(wave)).argmax() * rate / len(wave) - 440) < 2


def test_transcode_reports_every_failure_and_writes_no_manifest(tmp_path: Path) -> None:
    source = generate_dataset(tmp_path / "src", clips=3, classes=3, num_frames=8, size=48)
    for clip in read_manifest(source).clips[1:]:
        clip.video.write_bytes(b"broken" * 50)
    with pytest.raises(ManifestError) as info:
        transcode_manifest(source, tmp_path / "out", workers=1, progress=False)
    assert "2 of 3 clips failed" in str(info.value) and "clip_0001.webm" in str(info.value)
    assert not (tmp_path / "out" / "manifest.csv").exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 3 s of audio: longer than the 256-frame window, so the training audio crop moves
    return generate_dataset(tmp_path_factory.mktemp("baseline"), clips=4, classes=4, num_frames=20, size=80,
                            audio_seconds=3.0)


def test_baseline_loader_computes_what_dali_computes(dataset: Path) -> None:
    dali = next(iter(build_loader(dataset, 4, False, device="cpu", num_threads=2, spec=SMALL)))
    base = next(iter(build_baseline_loader(dataset, 4, False, num_workers=0, spec=SMALL)))
    def layout(batch):
        return {k: (v.shape, v.dtype) for k, v in batch.items()}

    assert layout(base) == layout(dali)
    assert torch.equal(base["index"], dali["index"]) and torch.equal(base["label"], dali["label"])
    # different resamplers (80 → 64 px) and chroma upsampling: close, not equal
    assert psnr(denormalize_video(base["video"], SMALL), denormalize_video(dali["video"], SMALL)) > 35
    above_300hz = slice(16, None)
    assert (base["audio"] - dali["audio"])[..., above_300hz].abs().max() < 0.01


def test_baseline_training_order_and_augmentation_are_dalis(dataset: Path) -> None:
    dali = build_loader(dataset, 2, True, device="cpu", seed=11, spec=SMALL, num_threads=2)
    base = build_baseline_loader(dataset, 2, True, num_workers=0, seed=11, spec=SMALL)
    for _ in range(2):  # and the next epoch: new order, new augmentation, still the same in both
        dali_batches, base_batches = list(dali), list(base)
        assert len(dali_batches) == len(base_batches) == 2
        for d, b in zip(dali_batches, base_batches, strict=True):
            assert torch.equal(b["index"], d["index"])
            # the same frames, crop window and flip (a flip would cost > 20 dB here) and audio window
            base_pixels, dali_pixels = denormalize_video(b["video"], SMALL), denormalize_video(d["video"], SMALL)
            for i in range(2):
                assert psnr(base_pixels[i], dali_pixels[i]) > 35 > psnr(base_pixels[i].flip(-1), dali_pixels[i])
            assert (b["audio"] - d["audio"])[..., 16:].abs().max() < 0.01  # bins above ~300 Hz


@pytest.mark.skipif(torchcodec_missing() is not None, reason=str(torchcodec_missing()))
@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_torchcodec_decoder_feeds_the_same_transforms(tmp_path: Path, codec: str) -> None:
    manifest = generate_dataset(tmp_path, clips=2, classes=2, num_frames=20, size=80, codec=codec,
                                audio_seconds=3.0)
    pyav = list(build_baseline_loader(manifest, 2, True, num_workers=0, seed=5, spec=SMALL))
    codec_batches = list(build_baseline_loader(manifest, 2, True, num_workers=0, seed=5, spec=SMALL,
                                               decoder="torchcodec"))
    assert len(pyav) == len(codec_batches) == 1
    p, t = pyav[0], codec_batches[0]
    assert torch.equal(p["index"], t["index"]) and torch.equal(p["label"], t["label"])
    # both are FFmpeg underneath: the same frames (same indices, crop, flip) to within rounding
    assert psnr(denormalize_video(p["video"], SMALL), denormalize_video(t["video"], SMALL)) > 45
    torch.testing.assert_close(t["audio"], p["audio"], rtol=0, atol=1e-4)


def test_unknown_baseline_decoder_is_an_error(dataset: Path) -> None:
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_baseline_loader(dataset, 2, True, num_workers=0, decoder="decord")


def test_decode_audio_resamples_to_16k(tmp_path: Path) -> None:
    t = np.arange(22050) / 22050
    path = tmp_path / "a.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 1000 * t), 22050)
    wave = decode_audio(path.read_bytes(), 16000)
    assert abs(wave.numel() - 16000) < 64
    assert abs(int(np.abs(np.fft.rfft(wave.numpy())).argmax()) * 16000 / wave.numel() - 1000) < 2
