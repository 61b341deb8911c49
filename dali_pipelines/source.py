"""The pipeline's one external source: epoch order, sharding, last batch, file bytes, frame indices.

One callable feeds every per-clip input of the DALI pipeline in the same batch — encoded video,
encoded audio, the frame indices to decode, the label and the manifest row — so audio, video and
label can never come from different clips. Everything that decides *which* clip lands where is
plain numpy, seeded by ``(seed, epoch)``, and therefore identical on every rank:

* epoch order: a permutation of the rows (training) or the rows in order (evaluation);
* sharding: rank ``s`` of ``S`` takes ``order[s::S]`` (as torch's ``DistributedSampler``);
* last batch, with DALI's :class:`LastBatchPolicy` names:

  - ``DROP`` (training): the order is first padded to a multiple of ``S`` by wrapping around (the
    repeats are real training samples with their true ``index``), then the incomplete last batch is
    dropped — every rank runs ``floor(ceil(N / S) / B)`` steps.
  - ``FILL`` (multi-rank evaluation): shards are padded to equal length and the last batch to ``B``
    with *padding samples* whose ``index`` is ``-1``; every clip appears exactly once with
    ``index >= 0`` over all ranks, and every rank runs ``ceil(ceil(N / S) / B)`` steps (what ZeRO-3
    needs: its forward pass gathers parameters collectively, so ranks must step together).
  - ``PARTIAL`` (single-rank evaluation): no repeats at all; the last batch is smaller; shards may
    differ by one clip.

Every random choice of training is drawn here too, from one generator per ``(seed, epoch, row)``
(:func:`clip_rng`, :func:`sample_clip`), so a sample depends on nothing but the seed, the epoch and
its manifest row — not on the rank, the number of ranks, the batch size, DALI's threads or the epoch a
run was resumed at: the temporal window (``num_frames`` frames ``stride`` apart from a random start;
clips shorter than the span are looped), the random-resized-crop window (it needs the frame size, which
the container knows), the flip and the audio window position. DALI only applies them. Evaluation uses
the centred window, a centre crop, no flip and the centred audio window — or, given an
:class:`EvalView`, one of several temporal windows and spatial crops (multi-view testing, see there).
"""

from __future__ import annotations

import functools
import io
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import soundfile as sf
import torch

from .augment import sample_audio_gain, sample_erase_boxes, sample_rand_augment
from .manifest import Manifest
from .spec import CENTRE_VIEW, ClipSpec, EvalView, LoaderOptions

if TYPE_CHECKING:  # DALI is imported only where the pipeline is built
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

# What DALI's fn.decoders.video decodes (its docstring): CPU backend VP8/VP9/MJPEG; the mixed (NVDEC)
# backend also AV1, MPEG-4, H.264 and HEVC. Names as FFmpeg (PyAV) reports them.
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_VIDEO_CODECS = CPU_VIDEO_CODECS | {"av1", "mpeg4", "h264", "hevc"}
# What DALI's fn.decoders.audio decodes (its docstring), as libsndfile names the formats.
AUDIO_FORMATS = frozenset({"WAV", "FLAC", "OGG"})
PAD_INDEX = -1  # ``index`` of padding samples (FILL policy)


class UnsupportedCodecError(ValueError):
    """A video whose codec the chosen DALI decoder cannot decode."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    num_frames: int
    width: int
    height: int


def probe_video(data: bytes | np.ndarray, path: str | Path = "<memory>", count_packets: bool = False) -> VideoInfo:
    """Codec, frame count and size of an encoded video, from its container (no decoding).

    The frame count is the container's when it stores one (MP4), else the number of video packets
    (WebM/Matroska do not store it; one packet holds one shown frame, VP9 superframes included).
    ``count_packets=True`` counts them for every container: the frames the file actually holds, which
    an MP4 cut short behind a front index (``-movflags +faststart``) no longer matches its header's count.
    """
    buf = io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)
    try:
        with av.open(buf) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stored = 0 if count_packets else stream.frames  # demuxing reads the whole file; skip it when it can
            count = stored or sum(1 for packet in container.demux(stream) if packet.size)
            ctx = stream.codec_context
            info = VideoInfo(ctx.name, int(count), int(ctx.width), int(ctx.height))
    except av.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    if info.num_frames < 1:
        raise ValueError(f"video {path} has no frames")
    return info


def check_audio(data: bytes | np.ndarray, path: str | Path, manifest: str | Path = "MANIFEST") -> None:
    """Raise ValueError naming the file unless it is WAV/FLAC/OGG audio with at least one sample."""
    buf = io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)
    try:
        info = sf.info(buf)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"cannot read audio {path}: {e}. DALI decodes WAV, FLAC and OGG; convert other "
                         f"formats with `python -m dali_pipelines.transcode {manifest} OUT_DIR`") from e
    if info.format not in AUDIO_FORMATS:
        raise ValueError(f"audio {path} is {info.format}, DALI decodes WAV, FLAC and OGG; convert it with "
                         f"`python -m dali_pipelines.transcode {manifest} OUT_DIR`")
    if info.frames < 1:
        raise ValueError(f"audio {path} has no samples")


class BadClipError(ValueError):
    """One clip that would poison training (empty, undecodable, truncated, too short, non-finite audio);
    the message names the file, the reason and the fix. ``bad_clips: skip`` skips such clips."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None, manifest: str | Path = "MANIFEST"):
        row = f"line {line} of {manifest}" if line is not None else f"its row in {manifest}"
        super().__init__(f"{path}: {reason}. Fix: re-extract or re-encode the file, or remove {row}; or set "
                         "`bad_clips: skip` in the config to leave such clips out (logged, up to "
                         "`max_bad_clip_fraction` of the manifest)")
        self.path, self.reason = Path(path), reason


TRUNCATION_TOLERANCE = 0.9  # a container holding < 90% of the frames its header declares is cut short
MAGIC = {  # the first bytes of the containers DALI reads (start-up probe, no decoding)
    "video": ((0, b"\x1a\x45\xdf\xa3"), (4, b"ftyp"), (0, b"RIFF"), (4, b"moov"), (4, b"mdat"), (4, b"free")),
    "audio": ((0, b"RIFF"), (0, b"RIFX"), (0, b"RF64"), (0, b"fLaC"), (0, b"ID3"), (0, b"OggS")),
}


def quick_check(path: Path, kind: str) -> str | None:
    """Start-up probe of one media file from its size and first bytes (cheap: no demuxing, no
    decoding); returns the problem or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as err:
        return f"cannot read the file ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if not any(head[at:at + len(magic)] == magic for at, magic in MAGIC[kind]):
        expected = "WebM/Matroska, MP4/MOV or AVI" if kind == "video" else "WAV, FLAC or OGG"
        return f"not a {kind} container DALI reads (expected {expected}; first bytes {head[:8]!r})"
    return None


def declared_frames(data: bytes | np.ndarray) -> int | None:
    """The frame count a video's header declares (stored count, else duration x frame rate); None
    when the container declares neither."""
    buf = io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)
    with av.open(buf) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        rate = stream.average_rate or stream.guessed_rate
        if container.duration and rate:
            return round(container.duration / av.time_base * float(rate))
    return None


def check_clip(video: np.ndarray, audio: np.ndarray, clip, spec: ClipSpec, manifest: str | Path) -> VideoInfo:
    """The full checks of one clip at decode time (once per clip); returns its :class:`VideoInfo` or
    raises :class:`BadClipError`: an empty, undecodable or truncated video, fewer frames than the model
    samples (``spec.num_frames``; shorter than the strided window is fine, frames are looped), audio
    that is empty, unreadable or holds NaN/inf samples."""
    def bad(path, reason):
        return BadClipError(path, reason, clip.line, manifest)

    if video.size == 0:
        raise bad(clip.video, "empty video file (0 bytes)")
    try:
        info = probe_video(video, clip.video, count_packets=True)  # not the header's count: that is `declared`
        declared = declared_frames(video)
    except (ValueError, av.FFmpegError) as err:
        raise bad(clip.video, f"undecodable video ({err})") from err
    if declared and info.num_frames < TRUNCATION_TOLERANCE * declared:
        raise bad(clip.video, f"truncated video: the header declares {declared} frames, the file holds "
                              f"{info.num_frames}")
    if info.num_frames < spec.num_frames:
        raise bad(clip.video, f"{info.num_frames} frame(s), fewer than the {spec.num_frames} the model samples per "
                              "clip (frames would repeat)")
    if audio.size == 0:
        raise bad(clip.audio, "empty audio file (0 bytes)")
    try:
        check_audio(audio, clip.audio, manifest)
        buf = io.BytesIO(audio.tobytes())
        if sf.info(buf).subtype in ("FLOAT", "DOUBLE"):  # integer PCM cannot hold a NaN
            buf.seek(0)
            samples, _ = sf.read(buf, dtype="float32", always_2d=True)
            nonfinite = int((~np.isfinite(samples)).sum())
            if nonfinite:
                raise bad(clip.audio, f"{nonfinite} non-finite audio sample(s) (NaN/inf; the fbank would turn "
                                      "constant)")
    except BadClipError:
        raise
    except ValueError as err:
        raise bad(clip.audio, f"unreadable audio ({err})") from err
    return info


def check_codec(info: VideoInfo, path: str | Path, device: str, manifest: str | Path = "MANIFEST") -> None:
    """Raise :class:`UnsupportedCodecError` naming the file and the fix when DALI cannot decode it."""
    allowed = CPU_VIDEO_CODECS if device == "cpu" else GPU_VIDEO_CODECS
    if info.codec in allowed:
        return
    command = f"python -m dali_pipelines.transcode {manifest} OUT_DIR"
    if device == "cpu" and info.codec in GPU_VIDEO_CODECS:
        raise UnsupportedCodecError(
            f"{path}: codec {info.codec!r} cannot be decoded by DALI's CPU video decoder, which takes only "
            f"VP8, VP9 and MJPEG. Either load with device='gpu' (NVDEC decodes {info.codec}), or decode on "
            "the CPU with video_decoder='torchcodec' (train.py: avfmae.data_video_decoder; needs torchcodec), "
            f"or re-encode the dataset once: `{command}` (writes VP9 + 16 kHz wav and a new manifest "
            "OUT_DIR/manifest.csv)."
        )
    decodable = "VP8, VP9, MJPEG" if device == "cpu" else "VP8, VP9, MJPEG, AV1, MPEG-4, H.264, HEVC"
    raise UnsupportedCodecError(
        f"{path}: codec {info.codec!r} is not decoded by DALI's {device.upper()} video decoder "
        f"({decodable}). Re-encode the dataset once: `{command}`."
    )


def sample_frame_indices(
    clip_frames: int, num_frames: int, stride: int, rng: np.random.Generator | None,
    clip_index: int = 0, num_clips: int = 1,
) -> np.ndarray:
    """Indices of ``num_frames`` frames ``stride`` apart, looped over short clips: int32 [num_frames].

    ``rng`` given: random start (uniform over the starts that fit, or over the whole clip when the
    span does not fit); ``rng`` None: window ``clip_index`` of ``num_clips`` evenly spaced ones — one
    window is the centred one; several start at ``int(clip_index * room / (num_clips - 1))``, ``room``
    the frames left beyond the span, so the first starts at frame 0 and the last ends at the clip's
    last frame (VideoMAE/HiCMAE's test ``temporal_start``, counted here in frames rather than in
    ``stride``-subsampled frames). Start 0 for every window when the span does not fit.
    """
    span = (num_frames - 1) * stride + 1
    room = clip_frames - span
    if rng is not None:
        start = int(rng.integers(0, room + 1)) if room >= 0 else int(rng.integers(0, clip_frames))
    elif room < 0:
        start = 0
    elif num_clips == 1:
        start = room // 2
    else:
        start = int(clip_index * room / (num_clips - 1))
    return ((start + stride * np.arange(num_frames)) % clip_frames).astype(np.int32)


def sample_crop_window(
    height: int, width: int, area: tuple[float, float], aspect: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels of a random-resized-crop window inside a ``height`` x ``width`` frame.

    torchvision's ``RandomResizedCrop`` (as VideoMAE/HiCMAE use it): up to 10 tries of an area fraction
    uniform in ``area`` and an aspect ratio (w / h) log-uniform in ``aspect``, the first that fits placed
    uniformly; otherwise the centred crop of the whole frame with its aspect ratio clamped to ``aspect``.
    """
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        ratio = math.exp(rng.uniform(*log_aspect))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, max(1, round(width / aspect[0]))  # at least a pixel, even for a 1-pixel frame
    elif ratio > aspect[1]:
        w, h = max(1, round(height * aspect[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ClipAugmentation:
    """The choices for one clip in one epoch: frame indices int32 [num_frames]; ``crop`` (top, left, h, w)
    in pixels, or None for evaluation's resize + square crop; horizontal ``flip``; ``audio_position``
    in [0, 1): where the audio window starts, as a fraction of the room + 1 starts that fit;
    ``crop_position`` (evaluation) in [0, 1]: where the square crop sits along the resized frame's
    longer side, as a fraction of the pixels left over (0.5: centre)."""

    frames: np.ndarray
    crop: tuple[int, int, int, int] | None
    flip: bool
    audio_position: float
    crop_position: float = 0.5
    # training augmentations of dali_pipelines.augment (their neutral values when off)
    rand_augment: np.ndarray | None = None           # int32 [3, n]: op, sign, magnitude bin per step
    erase: np.ndarray | None = None                  # int32 [count, 4]: (top, left, h, w), 0-sized = none
    audio_gain: float = 1.0


def clip_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    """The generator of every random choice for manifest ``row`` in ``epoch``."""
    return np.random.default_rng([seed, epoch, row])


def sample_clip(
    info: VideoInfo, spec: ClipSpec, rng: np.random.Generator | None, view: EvalView = CENTRE_VIEW
) -> ClipAugmentation:
    """Training choices drawn from ``rng`` (see :func:`clip_rng`), or evaluation's fixed ones of ``view``
    when None (default: centred window, centre crop; the audio window is centred in every view)."""
    if rng is None:
        frames = sample_frame_indices(info.num_frames, spec.num_frames, spec.frame_stride, None,
                                      view.clip_index, view.num_clips)
        return ClipAugmentation(frames, None, False, 0.5, view.crop_position)
    # The frames first, so the temporal windows stay those of the frames-only sampling before.
    frames = sample_frame_indices(info.num_frames, spec.num_frames, spec.frame_stride, rng)
    crop = sample_crop_window(info.height, info.width, spec.crop_area, spec.crop_aspect, rng)
    flip = bool(rng.random() < 0.5)  # drawn even when spec.flip is off, so the audio draw does not move
    # float32: the precision DALI computes the window start in (see baseline.audio_tensor)
    position = float(np.float32(rng.random()))
    # later augmentations draw from child generators: the choices above stay what they were, and each
    # augmentation's choices do not depend on which others are switched on
    ra_rng, erase_rng, gain_rng = rng.spawn(3)
    ra = sample_rand_augment(spec.rand_augment, ra_rng) if spec.rand_augment is not None else None
    erase = sample_erase_boxes(spec.erase_prob, spec.erase_count, spec.image_size, erase_rng) \
        if spec.erase_prob > 0 else None
    gain = sample_audio_gain(gain_rng) if spec.audio_gain else 1.0
    return ClipAugmentation(frames, crop, flip and spec.flip, position, rand_augment=ra, erase=erase,
                            audio_gain=gain)


def epoch_order(num_clips: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The manifest rows in the order of one epoch: int64 [num_clips]; same on every rank."""
    if not shuffle:
        return np.arange(num_clips, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_clips).astype(np.int64)


def shard_batches(
    order: np.ndarray, shard_id: int, num_shards: int, batch_size: int, policy: LastBatchPolicy
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split one epoch's order into this shard's batches: a list of (rows int64 [b], is_padding bool [b])."""
    n = len(order)
    per_shard = -(-n // num_shards)
    if policy.name == "PARTIAL":
        rows = order[shard_id::num_shards]
        padding = np.zeros(len(rows), dtype=bool)
    else:
        # Equal shards: wrap around the order. Under DROP the repeats are real samples; under FILL padding.
        padded = np.resize(order, per_shard * num_shards)
        rows = padded[shard_id::num_shards]
        padding = np.arange(len(padded))[shard_id::num_shards] >= n
        if policy.name == "DROP":
            padding[:] = False
            keep = (len(rows) // batch_size) * batch_size
            rows, padding = rows[:keep], padding[:keep]
        elif len(rows) % batch_size:
            extra = batch_size - len(rows) % batch_size
            rows = np.concatenate([rows, np.resize(rows, extra)])
            padding = np.concatenate([padding, np.ones(extra, dtype=bool)])
    return [(rows[i:i + batch_size], padding[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def batches_per_epoch(
    num_clips: int, shard_id: int, num_shards: int, batch_size: int, policy: LastBatchPolicy
) -> int:
    """Steps per epoch of shard ``shard_id`` (the same on every shard except, maybe, under PARTIAL)."""
    if policy.name == "PARTIAL":
        return -(-len(range(shard_id, num_clips, num_shards)) // batch_size)
    per_shard = -(-num_clips // num_shards)
    if policy.name == "DROP":
        return per_shard // batch_size
    return -(-per_shard // batch_size)


@dataclass(frozen=True)
class SourceOutput:
    """One output of :class:`ClipSource`: its name (the key the pipeline reads it by), numpy dtype and DALI
    layout ("" for none). :attr:`ClipSource.outputs` declares them all, in the order they are fed."""

    name: str
    dtype: np.dtype
    layout: str = ""


def _out(name: str, dtype, layout: str = "") -> SourceOutput:
    return SourceOutput(name, np.dtype(dtype), layout)


# the training augmentations' outputs (when the spec switches them on), after the audio position
AUGMENT_OUTPUTS = {"rand_augment": _out("rand_augment", np.int32), "erase_anchor": _out("erase_anchor", np.float32),
                   "erase_shape": _out("erase_shape", np.float32), "audio_gain": _out("audio_gain", np.float32)}


class ClipSource:
    """DALI external source (batch mode, called with ``BatchInfo``) yielding one batch of clips.

    Outputs (:attr:`outputs` declares their names, dtypes and layouts), each a list with one entry per
    sample: ``video`` bytes (uint8 [n]), ``audio`` bytes (uint8 [n]), ``frame_indices`` (int32
    [num_frames]); in training also the crop window's ``crop_start`` (top, left) and ``crop_shape`` (h, w)
    (int32 [2] each), the ``flip`` (int32 []), the ``audio_position`` (float32 []), the ``rand_augment``
    steps (int32 [3, n]), the erased boxes' ``erase_anchor`` and ``erase_shape`` (float32 [2k] each, (y, x)
    pairs) and the ``audio_gain`` (float32 []), those four only when the spec switches them on
    (:mod:`dali_pipelines.augment`), in evaluation the ``crop_position`` along the longer side (float32 [],
    see :class:`EvalView`); then ``label`` (int64 [] class, float32 [L] regression, int64 [] -1
    unlabelled) and ``index``, the manifest row (int64 [], -1 for padding). With
    ``video_decoder="torchcodec"`` ``video`` holds the clip's decoded frames instead (uint8 [num_frames,
    H, W, 3], layout FHWC) and there is no ``frame_indices``: torchcodec decodes them, on a pool of
    ``options.threads`` threads. The other settings come from ``options`` (:class:`LoaderOptions`).

    Raises StopIteration at the end of an epoch. DALI counts epochs from 0 for every new pipeline;
    ``start_epoch`` is added (resuming training), and the first epoch starts at its batch ``start_batch``
    (resuming mid-epoch: the batches before it are never read nor decoded).
    """

    def __init__(self, manifest: Manifest, batch_size: int, train: bool, policy: LastBatchPolicy,
                 options: LoaderOptions | None = None) -> None:
        options = options or LoaderOptions()
        self.manifest = manifest
        self.batch_size = batch_size
        self.train = train
        self.policy = policy
        self.options = options
        self.device, self.spec, self.seed = options.device, options.spec, options.seed
        self.shard_id, self.num_shards = options.shard_id, options.num_shards
        self.start_epoch, self.start_batch = options.start_epoch, options.start_batch
        self.view = options.view or CENTRE_VIEW
        self.bad_clips, self.max_bad_clip_fraction = options.bad_clips, options.max_bad_clip_fraction
        self.video_decoder = options.video_decoder
        self.skipped: dict[int, str] = {}  # manifest row -> why it is left out (bad_clips="skip")
        self.labels = manifest.labels()
        # torchcodec's decoding releases the GIL: decode a batch's clips in parallel. One torch thread per
        # decoding thread (torch's intra-op threads are per calling thread): with the default, torch's
        # OpenMP workers of each decoding thread spin beside DALI's and cost 5x the CPU time per clip.
        self._pool = (ThreadPoolExecutor(options.threads, initializer=torch.set_num_threads, initargs=(1,))
                      if self.video_decoder == "torchcodec" else None)
        self._infos: dict[int, VideoInfo] = {}
        self._checked: set[int] = set()  # rows whose media passed check_clip
        self._epoch = -1
        self._batches: list[tuple[np.ndarray, np.ndarray]] = []

    @functools.cached_property
    def outputs(self) -> tuple[SourceOutput, ...]:
        """The declared outputs, in the order :meth:`__call__` returns them (see the class docstring)."""
        decoded = self.video_decoder == "torchcodec"  # the source gives frames, not bytes + frame indices
        media = [_out("video", np.uint8, "FHWC" if decoded else ""), _out("audio", np.uint8)]
        if not decoded:
            media.append(_out("frame_indices", np.int32))
        if self.train:
            spec = self.spec
            switched = (("rand_augment",) * (spec.rand_augment is not None) + ("erase_anchor", "erase_shape")
                        * (spec.erase_prob > 0) + ("audio_gain",) * spec.audio_gain)
            choices = [_out("crop_start", np.int32), _out("crop_shape", np.int32), _out("flip", np.int32),
                       _out("audio_position", np.float32), *(AUGMENT_OUTPUTS[name] for name in switched)]
        else:
            choices = [_out("crop_position", np.float32)]
        return (*media, *choices, _out("label", self.labels.dtype), _out("index", np.int64))

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def __len__(self) -> int:
        n = len(self.manifest)
        return batches_per_epoch(n, self.shard_id, self.num_shards, self.batch_size, self.policy)

    def epoch_batches(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This shard's batches of ``epoch`` as (rows, is_padding) pairs."""
        order = epoch_order(len(self.manifest), epoch, self.seed, shuffle=self.train)
        return shard_batches(order, self.shard_id, self.num_shards, self.batch_size, self.policy)

    def _clip_inputs(self, row: int, epoch: int) -> dict[str, np.ndarray]:
        """The per-clip outputs of ``row`` by name (all of :attr:`outputs` but label and index)."""
        clip = self.manifest.clips[row]
        video = np.fromfile(clip.video, dtype=np.uint8)
        audio = np.fromfile(clip.audio, dtype=np.uint8)
        if row not in self._checked:  # the full media checks once per clip; later epochs reuse them
            self._infos[row] = check_clip(video, audio, clip, self.spec, self.manifest.path)
            if self.video_decoder == "dali":
                check_codec(self._infos[row], clip.video, self.device, self.manifest.path)
            self._checked.add(row)
        decoder = None
        if self.video_decoder == "torchcodec":  # any codec FFmpeg decodes; its scan gives the info
            from .decoders import torchcodec_frames, torchcodec_video

            decoder, self._infos[row] = torchcodec_video(video, clip.video)
        rng = clip_rng(self.seed, epoch, row) if self.train else None
        aug = sample_clip(self._infos[row], self.spec, rng, self.view)
        if decoder is None:
            inputs = {"video": video, "audio": audio, "frame_indices": aug.frames}
        else:
            inputs = {"video": torchcodec_frames(decoder, aug.frames), "audio": audio}
        if not self.train:
            return inputs | {"crop_position": aug.crop_position}
        top, left, h, w = aug.crop
        inputs.update(crop_start=(top, left), crop_shape=(h, w), flip=aug.flip, audio_position=aug.audio_position,
                      rand_augment=aug.rand_augment, audio_gain=aug.audio_gain)
        if aug.erase is not None:
            inputs.update(erase_anchor=aug.erase[:, :2].reshape(-1), erase_shape=aug.erase[:, 2:].reshape(-1))
        return inputs

    def _usable_inputs(self, row: int, epoch: int) -> tuple[int, dict[str, np.ndarray]]:
        """(row, inputs) of ``row``; under ``bad_clips="skip"`` a bad clip is logged once and the next
        usable row in manifest order stands in (a function of the data only, so resuming sees the same),
        until more than ``max_bad_clip_fraction`` of this rank's share is bad."""
        n = len(self.manifest)
        for candidate in ((row + k) % n for k in range(n)):
            if candidate in self.skipped:
                continue
            try:
                return candidate, self._clip_inputs(candidate, epoch)
            except BadClipError as err:
                if self.bad_clips == "error":
                    raise
                self.skipped[candidate] = err.reason
                print(f"bad_clips=skip: skipping {err.path} (line {self.manifest.clips[candidate].line} of "
                      f"{self.manifest.path}): {err.reason}", file=sys.stderr, flush=True)
                share = n / self.num_shards
                if len(self.skipped) > self.max_bad_clip_fraction * share:
                    raise ValueError(f"{self.manifest.path}: {len(self.skipped)} bad clips on shard {self.shard_id} "
                                     f"(~{share:.0f} clips), more than max_bad_clip_fraction="
                                     f"{self.max_bad_clip_fraction}; the dataset needs repair (see the messages "
                                     "above)") from err
        raise ValueError(f"{self.manifest.path}: no usable clip left")

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        if self.start_epoch + info.epoch_idx != self._epoch:
            self._epoch = self.start_epoch + info.epoch_idx
            self._batches = self.epoch_batches(self._epoch)
        batch = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        if batch >= len(self._batches):
            raise StopIteration
        rows, padding = self._batches[batch]
        epoch = self._epoch
        if self._pool is None:
            samples = [self._usable_inputs(row, epoch) for row in rows.tolist()]
        else:
            samples = list(self._pool.map(lambda row: self._usable_inputs(row, epoch), rows.tolist()))
        batch_outputs: dict[str, list[np.ndarray]] = {out.name: [] for out in self.outputs}
        for (row, sample), is_pad in zip(samples, padding.tolist(), strict=True):
            sample.update(label=self.labels[row], index=PAD_INDEX if is_pad else row)
            for out in self.outputs:  # in the declared order and dtype (no copy where it already is)
                batch_outputs[out.name].append(np.asarray(sample[out.name], out.dtype))
        return tuple(batch_outputs.values())
