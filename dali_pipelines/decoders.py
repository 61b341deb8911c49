"""torchcodec (PyTorch's FFmpeg-based decoder) as an optional CPU video/audio decoder.

Used by the DALI pipeline's CPU path with ``video_decoder="torchcodec"`` (the external source decodes
the clip's frames, DALI does everything after decoding: any codec FFmpeg decodes — H.264, HEVC,
MPEG-4, AV1, VP9 — instead of DALI's CPU decoder's VP8/VP9/MJPEG) and by the torchcodec peer of the
data benchmark (:mod:`dali_pipelines.baseline`). Install with ``pip install torchcodec``: a build for
the installed torch (PyPI's recent wheels are CUDA builds; with a CPU torch take PyTorch's CPU wheel
index, or 0.11, PyPI's last CPU wheel, which loads with torch 2.13) and FFmpeg's shared libraries
(4 to 7; Debian/Ubuntu: ``apt-get install ffmpeg``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .source import VideoInfo


def torchcodec_missing() -> str | None:
    """Why torchcodec cannot be used here (not installed, or its libraries do not load), or None."""
    try:
        import torchcodec.decoders  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # e.g. a wheel built for another torch or CUDA
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"torchcodec unavailable: {type(e).__name__}: {first_line}"
    return None


def torchcodec_video(data: bytes | np.ndarray, path: str | Path = "<memory>", threads: int = 1):
    """(torchcodec ``VideoDecoder`` over the encoded bytes, its :class:`VideoInfo`). Exact seek mode: it
    scans the file once, so frame indices are exact and the frame count is known for WebM too."""
    from torchcodec.decoders import VideoDecoder

    source = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    try:
        decoder = VideoDecoder(source, device="cpu", num_ffmpeg_threads=threads, dimension_order="NHWC")
        meta = decoder.metadata
        info = VideoInfo(meta.codec, int(meta.num_frames or 0), int(meta.width or 0), int(meta.height or 0))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    if info.num_frames < 1:
        raise ValueError(f"video {path} has no frames")
    return decoder, info


def torchcodec_frames(decoder, indices: np.ndarray) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) of a decoder from :func:`torchcodec_video`:
    uint8 [len(indices), H, W, 3]."""
    return decoder.get_frames_at(indices.tolist()).data.numpy()


def torchcodec_audio(data: bytes, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate`` (torchcodec's ``AudioDecoder`` downmixes and resamples)."""
    from torchcodec.decoders import AudioDecoder

    return AudioDecoder(data, sample_rate=sample_rate, num_channels=1).get_all_samples().data[0]
