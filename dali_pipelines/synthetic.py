"""Synthetic audio-visual clips for the demo, the tests and the benchmarks.

``python -m dali_pipelines.synthetic OUT_DIR --clips N --classes C [--seed S]`` writes N short VP9
clips of a face-like shape (a skin-coloured ellipse with eyes and a mouth on a coloured background)
and N 16 kHz wav files, plus ``OUT_DIR/manifest.csv``. Clip ``i`` has class ``i % C``; the class
decides the background hue, the direction the face drifts in and how fast the mouth opens and
closes, and the pitch of the audio (log-spaced 200 Hz–7 kHz over the classes, with two harmonics and
a syllable-like envelope). Per-clip phases and noise come from ``(seed, i)``: the output is
deterministic given the seed.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from .manifest import read_manifest, write_manifest

VIDEO_CODECS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4"), "mpeg4": ("mpeg4", "mp4")}


def class_pitch(cls: int, classes: int) -> float:
    """Fundamental frequency (Hz) of class ``cls``: log-spaced from 200 Hz to 7 kHz."""
    return 200.0 * (7000.0 / 200.0) ** (cls / max(classes - 1, 1))


def class_background(cls: int, classes: int) -> np.ndarray:
    """Background RGB (uint8 [3]) of class ``cls``: evenly spaced hues."""
    r, g, b = colorsys.hsv_to_rgb(cls / max(classes, 1), 0.7, 0.8)
    return np.array([r, g, b]) * 255


def face_frames(cls: int, classes: int, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [num_frames, size, size, 3]: a face drifting in a class-dependent direction."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = 2 * math.pi * cls / max(classes, 1) + rng.uniform(-0.2, 0.2)
    speed = size * rng.uniform(0.004, 0.008)
    mouth_hz = 0.05 + 0.1 * cls / max(classes, 1)  # mouth cycles per frame
    phase = rng.uniform(0, 2 * math.pi)
    background = class_background(cls, classes)
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        drift = speed * (t - num_frames / 2)
        cx = size / 2 + drift * math.cos(angle)
        cy = size / 2 + drift * math.sin(angle)
        frame = np.broadcast_to(background, (size, size, 3)).copy()
        face = ((xx - cx) / (0.28 * size)) ** 2 + ((yy - cy) / (0.36 * size)) ** 2 < 1
        frame[face] = (224, 172, 140)
        for ex in (-0.11, 0.11):
            eye = (xx - cx - ex * size) ** 2 + (yy - cy + 0.1 * size) ** 2 < (0.035 * size) ** 2
            frame[eye] = (40, 30, 30)
        opening = 0.01 + 0.04 * (1 + math.sin(2 * math.pi * mouth_hz * t + phase)) / 2
        mouth = ((xx - cx) / (0.1 * size)) ** 2 + ((yy - cy - 0.18 * size) / (opening * size)) ** 2 < 1
        frame[mouth] = (120, 30, 40)
        out[t] = frame
    return out


def tone(cls: int, classes: int, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n] in [-1, 1]: the class pitch with two harmonics, a syllable envelope and light noise."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = class_pitch(cls, classes)
    harmonics = [(1, 1.0), (2, 0.4), (3, 0.2)]
    wave = sum(a * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
               for k, a in harmonics if k * f0 < sample_rate / 2)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2.0, 4.0) * t + rng.uniform(0, 2 * np.pi))
    wave = 0.25 * envelope * wave + 0.01 * rng.standard_normal(t.size)
    return np.clip(wave, -1, 1).astype(np.float32)


def encode_video(frames: np.ndarray, fps: int = 25, codec: str = "vp9", quality: int = 20) -> bytes:
    """Encode uint8 [T, H, W, 3] RGB frames; ``codec`` "vp9" (WebM), "h264" or "mpeg4" (MP4)."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {codec!r}")
    encoder, container_format = VIDEO_CODECS[codec]
    buf = io.BytesIO()
    # bitexact: no random track UIDs or dates in the container, so the bytes depend only on the frames
    with av.open(buf, "w", format=container_format, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "vp9":
            # constant quality, fastest preset, one thread: deterministic output
            stream.options = {"crf": str(quality), "b:v": "0", "deadline": "realtime", "cpu-used": "8",
                              "threads": "1", "row-mt": "0"}
        elif codec == "h264":
            stream.options = {"crf": str(quality), "preset": "ultrafast", "threads": "1"}
        else:
            stream.options = {"qscale": "3", "threads": "1"}
            stream.codec_context.qscale = 3
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def generate_dataset(
    out_dir: str | Path,
    clips: int = 12,
    classes: int = 4,
    seed: int = 0,
    num_frames: int = 32,
    size: int = 160,
    fps: int = 25,
    sample_rate: int = 16000,
    codec: str = "vp9",
    audio_seconds: float | None = None,
) -> Path:
    """Write ``clips`` clips (video ``clip_XXXX.webm``/``.mp4``, audio ``clip_XXXX.wav``) and a manifest.

    ``audio_seconds`` defaults to the video's duration. Returns the path of ``OUT_DIR/manifest.csv``.
    """
    if clips < 1 or classes < 1:
        raise ValueError(f"clips and classes must be >= 1, got clips={clips}, classes={classes}")
    if num_frames < 1 or size < 16 or size % 2:
        raise ValueError(f"need num_frames >= 1 and an even size >= 16, got {num_frames}, {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = VIDEO_CODECS[codec][1] if codec in VIDEO_CODECS else None
    seconds = num_frames / fps if audio_seconds is None else audio_seconds
    rows = []
    for i in range(clips):
        cls = i % classes
        rng = np.random.default_rng([seed, i])
        video_path, audio_path = out / f"clip_{i:04d}.{ext}", out / f"clip_{i:04d}.wav"
        video_path.write_bytes(encode_video(face_frames(cls, classes, num_frames, size, rng), fps, codec))
        audio_path.write_bytes(encode_wav(tone(cls, classes, seconds, sample_rate, rng), sample_rate))
        rows.append((video_path, audio_path, cls))
    return write_manifest(out / "manifest.csv", rows)


def split_manifest(manifest: Path, train_clips: int) -> tuple[Path, Path]:
    """Write ``train.csv`` (the first ``train_clips`` rows) and ``val.csv`` (the rest) beside ``manifest``."""
    rows = [(c.video, c.audio, int(c.label[0])) for c in read_manifest(manifest).clips]  # class labels
    return (write_manifest(manifest.with_name("train.csv"), rows[:train_clips]),
            write_manifest(manifest.with_name("val.csv"), rows[train_clips:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dali_pipelines.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (25 fps)")
    parser.add_argument("--size", type=int, default=160, help="frame width and height in pixels")
    parser.add_argument("--codec", choices=sorted(VIDEO_CODECS), default="vp9",
                        help="vp9 (decodable on CPU and GPU) or h264/mpeg4 (NVDEC, or the CPU with "
                             "video_decoder='torchcodec'; also tests the transcoder)")
    parser.add_argument("--val-clips", type=int, default=0,
                        help="also split the clips: the last VAL_CLIPS rows go to val.csv, the rest to train.csv")
    args = parser.parse_args(argv)
    if not 0 <= args.val_clips < args.clips:
        parser.error(f"--val-clips must lie in [0, clips={args.clips}), got {args.val_clips}")
    manifest = generate_dataset(args.out_dir, args.clips, args.classes, args.seed, args.frames, args.size,
                                codec=args.codec)
    print(f"wrote {args.clips} clips and {manifest}")
    if args.val_clips:
        train, val = split_manifest(manifest, args.clips - args.val_clips)
        print(f"split: {train} ({args.clips - args.val_clips} clips), {val} ({args.val_clips} clips)")


if __name__ == "__main__":
    main()
