"""The DALI audio-visual pipeline and its PyTorch iterator.

Graph, per batch (``device="gpu"``: decoding on NVDEC, everything after it on the GPU; ``"cpu"``: all
on CPU threads)::

    ClipSource ─ video bytes ─ decoders.video(frames=indices) ─ slice(crop window) + resize | resize+
               │             square crop(crop position) ─ crop_mirror_normalize(mirror=flip) → [3, T, S, S]
               ├ audio bytes ─ decoders.audio(16 kHz mono) ─ − mean ─ preemphasis ─ spectrogram
               │             ─ mel_filter_bank ─ to_decibels(ln) ─ crop(position)/pad time ─ normalise
               │                                                                      → [1, 256, 128]
               ├ label, index ──────────────────────────────────────────────────────────→ as fed

Every random choice (frames, crop window, flip, audio position; RandAugment steps, erased boxes and
audio gain when the spec switches them on, see :mod:`dali_pipelines.augment`) comes from the source,
drawn per ``(seed, epoch, manifest row)`` (:func:`dali_pipelines.source.sample_clip`), and reaches the
operators as CPU argument inputs; the graph's one random operator is the noise that fills erased boxes.
So do evaluation's choices: the frames and the crop position of the test view
(:class:`dali_pipelines.source.EvalView`).

Audio features follow HiCMAE's Kaldi fbank (see :mod:`dali_pipelines.fbank`) as far as DALI's operators
allow: a symmetric Hann window (Kaldi "hanning"), 512-point FFT, frames only where they fit (Kaldi
``snip_edges``), 128 HTK-mel triangles 20 Hz–Nyquist with peak 1 (``normalize=False``), natural log
floored at float32 eps (``to_decibels`` with ``multiplier=ln 10``, ``reference=1.0`` — its default
reference is the per-sample maximum — and ``cutoff_db=ln eps``). Pre-emphasis over the whole signal
equals Kaldi's per-frame pre-emphasis because the window is zero at each frame's first sample. What
remains different: Kaldi removes each frame's mean before pre-emphasis (DALI cannot), and DALI's
triangles are linear in Hz rather than in mel; ``tests/test_data_fbank.py`` bounds the difference.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .augment import apply_audio_gain, apply_rand_augment, apply_random_erasing
from .fbank import LOG_FLOOR, kaldi_window
from .manifest import Manifest, read_manifest
from .source import CENTRE_VIEW, ClipSource, EvalView
from .spec import ClipSpec

OUTPUT_NAMES = ("video", "audio", "label", "index")
DEVICES = ("gpu", "cpu")
VIDEO_DECODERS = ("dali", "torchcodec")
# the numpy dtypes of the source's outputs (ClipSource.outputs) as DALI's
DALI_TYPES = {np.dtype(np.uint8): types.UINT8, np.dtype(np.int32): types.INT32, np.dtype(np.int64): types.INT64,
              np.dtype(np.float32): types.FLOAT}


def _video_graph(encoded, frame_idx, spec: ClipSpec, device: str, crop=None, flip=None, crop_position=0.5,
                 rand_augment=None, erase=None, decoded: bool = False):
    """Decode (unless ``decoded``: the source gave the frames, FHWC uint8), then crop window ``crop`` =
    ((top, left), (h, w)) resized to S x S, RandAugment (the ops of ``rand_augment``, the same for every
    frame), normalised and mirrored by ``flip``, random erasing (``erase`` = (anchors, shapes))
    (training), or (evaluation, ``crop`` None) resize of the shorter side to S and the S x S crop at
    ``crop_position`` along the longer side (a fraction of the pixels left over; 0.5 = centre)."""
    frames = encoded if decoded else fn.decoders.video(
        encoded, device="mixed" if device == "gpu" else "cpu", frames=frame_idx, pad_mode="edge"
    )  # [T, H, W, 3] uint8
    size = spec.image_size
    mean = [255 * m for m in spec.video_mean]
    std = [255 * s for s in spec.video_std]
    if crop is not None:
        start, shape = crop
        # trim, not fail, should the decoder's frame be smaller than the container's stated size
        frames = fn.slice(frames, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="trim_to_shape")
        frames = fn.resize(frames, size=[size, size], antialias=True)
        if spec.rand_augment is not None:
            frames = apply_rand_augment(frames, rand_augment, spec.rand_augment, size)
        video = fn.crop_mirror_normalize(
            frames, mirror=flip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CFHW"
        )
        return apply_random_erasing(video, *erase) if spec.erase_prob > 0 else video
    frames = fn.resize(frames, resize_shorter=size, antialias=True)
    # the same fraction on both axes: the shorter side has no pixels left over, so only the longer moves
    return fn.crop_mirror_normalize(
        frames, crop=(size, size), crop_pos_x=crop_position, crop_pos_y=crop_position, mean=mean, std=std,
        dtype=types.FLOAT, output_layout="CFHW",
    )  # [3, T, S, S]


def _audio_graph(encoded, spec: ClipSpec, device: str, position=0.5, gain=None):
    """Kaldi-style normalised fbank [1, audio_frames, F]; the window starts at ``position`` (a fraction
    of the frames beyond ``audio_frames``; a CPU input in training, the centre in evaluation)."""
    wave, _ = fn.decoders.audio(encoded, sample_rate=spec.sample_rate, downmix=True, dtype=types.FLOAT)
    wave = fn.pad(wave, shape=[spec.window_length])  # at least one frame, even for a tiny file
    if gain is not None:
        wave = apply_audio_gain(wave, gain)
    if device == "gpu":
        wave = wave.gpu()
    wave = wave - fn.reductions.mean(wave)  # HiCMAE: waveform - waveform.mean()
    wave = fn.preemphasis_filter(wave, preemph_coeff=0.97)
    power = fn.spectrogram(
        wave, nfft=1 << (spec.window_length - 1).bit_length(), window_length=spec.window_length,
        window_step=spec.window_step, window_fn=kaldi_window("hanning", spec.window_length).tolist(),
        center_windows=False, power=2, layout="tf",
    )
    mel = fn.mel_filter_bank(
        power, nfilter=spec.audio_bins, sample_rate=spec.sample_rate, freq_low=20.0,
        freq_high=spec.sample_rate / 2, mel_formula="htk", normalize=False,
    )
    # natural log floored at eps: ln(x) = ln(10) * log10(x / 1.0); the default reference is the sample max
    logmel = fn.to_decibels(mel, multiplier=math.log(10), reference=1.0, cutoff_db=math.log(LOG_FLOOR))
    length = logmel.shape(dtype=types.INT32)[0]
    start = fn.cast(dmath.floor(position * dmath.max(length - spec.audio_frames, 0)), dtype=types.INT32)
    logmel = fn.slice(
        logmel, start=fn.stack(start), shape=[spec.audio_frames], axes=[0], out_of_bounds_policy="pad",
        fill_values=0.0,
    )  # [audio_frames, F]; zeros appended to short clips before normalising, as HiCMAE
    audio = (logmel - spec.audio_mean) / spec.audio_std
    return fn.expand_dims(audio, axes=[0], new_axis_names="C")  # [1, audio_frames, F]


def _check_view(view, train: bool) -> EvalView:
    """The test view as an :class:`EvalView` (default: centred window, centre crop); evaluation only."""
    if view is None:
        return CENTRE_VIEW
    if train:
        raise ValueError(f"view={view!r} applies to evaluation (train=False); training samples its own "
                         "windows and crops")
    return EvalView.of(view)


def _check_args(batch_size, device, num_threads, shard_id, num_shards, seed, start_epoch) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("num_threads", num_threads, 1),
                             ("num_shards", num_shards, 1), ("shard_id", shard_id, 0), ("seed", seed, 0),
                             ("start_epoch", start_epoch, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if shard_id >= num_shards:
        raise ValueError(f"shard_id must be < num_shards={num_shards}, got {shard_id}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' needs CUDA, which is not available here; use device='cpu' "
                         "(VP8/VP9/MJPEG videos; see python -m dali_pipelines.transcode)")


def _check_video_decoder(video_decoder: str, device: str) -> None:
    if video_decoder not in VIDEO_DECODERS:
        raise ValueError(f"video_decoder must be one of {VIDEO_DECODERS}, got {video_decoder!r}")
    if video_decoder == "torchcodec":
        if device != "cpu":
            raise ValueError("video_decoder='torchcodec' is the CPU path (device='cpu'); with device='gpu' "
                             "DALI decodes on NVDEC")
        from .decoders import torchcodec_missing

        if why := torchcodec_missing():
            raise ValueError(f"video_decoder='torchcodec': {why}. Install torchcodec for this torch and "
                             "FFmpeg's shared libraries (see dali_pipelines.decoders)")


def default_policy(train: bool, num_shards: int) -> LastBatchPolicy:
    """DROP for training, FILL (padding marked index -1) for multi-rank evaluation, else PARTIAL."""
    if train:
        return LastBatchPolicy.DROP
    return LastBatchPolicy.FILL if num_shards > 1 else LastBatchPolicy.PARTIAL


def build_pipeline(
    manifest: Manifest | str | Path,
    batch_size: int,
    train: bool,
    device: str = "gpu",
    num_threads: int = 4,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    spec: ClipSpec | None = None,
    last_batch_policy: LastBatchPolicy | None = None,
    device_id: int | None = None,
    start_epoch: int = 0,
    prefetch_queue_depth: int = 2,
    view: EvalView | tuple[int, int, int, int] | None = None,
    bad_clips: str = "error",
    max_bad_clip_fraction: float = 0.0,
    start_batch: int = 0,
    video_decoder: str = "dali",
) -> tuple[Pipeline, ClipSource]:
    """Build (not yet started) the DALI pipeline for one rank and the external source that feeds it.

    Args:
        manifest: a :class:`Manifest` or a manifest path (read and validated here).
        batch_size: clips per batch on this rank.
        train: random temporal start, random-resized crop (torchvision semantics), flip, random audio
            crop and a per-epoch shuffle; otherwise centred windows, centre crop, manifest order.
        device: "gpu" (NVDEC + GPU operators; outputs on ``cuda:device_id``) or "cpu" (VP8/VP9/MJPEG only).
        num_threads: DALI CPU worker threads.
        seed: shuffling and every augmentation choice; use the same on every rank.
        shard_id, num_shards: this rank's slice of every epoch (rank, world size).
        spec: sample sizes and normalisation (:class:`ClipSpec`; default the model's shapes).
        last_batch_policy: see :mod:`dali_pipelines.source`; default :func:`default_policy`.
        device_id: CUDA device for device="gpu" (default: the current one).
        start_epoch: the epoch of the first pass, for resuming: clip order, frames, crops, flips and
            audio windows are exactly those an uninterrupted run sees in that epoch (each a function of
            seed, epoch and manifest row only, whatever the sharding, batch size or threads).
        prefetch_queue_depth: batches DALI prepares ahead.
        view: evaluation only: the test view (:class:`EvalView` or (clip_index, num_clips, crop_index,
            num_crops)) — which of ``num_clips`` evenly spaced temporal windows and ``num_crops`` crops
            along the longer side; audio stays the centred window. None: centred window, centre crop.
        bad_clips: "error" (default): a clip that fails the decode-time checks (empty, undecodable,
            truncated, too few frames, NaN/inf audio; :func:`source.check_clip`) raises
            :class:`source.BadClipError` naming the file, the reason and the fix; "skip": it is logged
            and the next usable row stands in, until more than ``max_bad_clip_fraction`` of this rank's
            share is bad.
        video_decoder: "dali" (DALI's decoder: NVDEC with device="gpu", VP8/VP9/MJPEG with "cpu") or, with
            device="cpu", "torchcodec": the external source decodes the frames with torchcodec (any codec
            FFmpeg has, e.g. an H.264 dataset as shipped) and DALI does the rest; see docs/design-notes.md.
        start_batch: resuming mid-epoch: the first pass starts at this batch of ``start_epoch`` (the
            batches before it are neither read nor decoded); later epochs are whole. 0 <= start_batch
            < ``len(source)``.

    Returns:
        (pipeline, source): the pipeline's outputs are video float32 [3, T, S, S], audio float32
        [1, audio_frames, audio_bins], label (int64 [] or float32 [L]) and index (int64 []); ``len(source)``
        is the number of batches per epoch (the first pass has ``start_batch`` fewer). Running past the
        epoch raises StopIteration.
    """
    _check_args(batch_size, device, num_threads, shard_id, num_shards, seed, start_epoch)
    _check_video_decoder(video_decoder, device)
    view = _check_view(view, train)
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    spec = spec or ClipSpec()
    if not isinstance(spec, ClipSpec):
        raise TypeError(f"spec must be a ClipSpec, got {type(spec).__name__}")
    policy = default_policy(train, num_shards) if last_batch_policy is None else last_batch_policy
    if not isinstance(policy, LastBatchPolicy):
        raise TypeError(f"last_batch_policy must be a nvidia.dali LastBatchPolicy, got {policy!r}")
    source = ClipSource(manifest, batch_size, train, device, spec, seed, shard_id, num_shards, policy,
                        start_epoch, view, bad_clips=bad_clips, max_bad_clip_fraction=max_bad_clip_fraction,
                        start_batch=start_batch, video_decoder=video_decoder, decode_threads=num_threads)
    if len(source) == 0:
        raise ValueError(
            f"shard {shard_id}/{num_shards} of {manifest.path} ({len(manifest)} clips) yields no batch of "
            f"{batch_size} under {policy.name}; lower batch_size or num_shards"
        )
    if not isinstance(start_batch, int) or isinstance(start_batch, bool) or not 0 <= start_batch < len(source):
        raise ValueError(f"start_batch must be an int in [0, {len(source)}) (batches per epoch of shard "
                         f"{shard_id}), got {start_batch!r}")
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()

    schema = source.outputs  # the source's declared (name, dtype, layout) outputs
    dtypes = [DALI_TYPES[out.dtype] for out in schema]
    layouts = [out.layout for out in schema]

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
        # the source draws every choice; the graph's only random operator is the erasing noise
        seed=seed % 2**31, prefetch_queue_depth=prefetch_queue_depth,
        # RandAugment picks each sample's operation with DALI conditionals
        enable_conditionals=train and spec.rand_augment is not None,
    )
    def av_pipeline():
        fed = fn.external_source(source=source, num_outputs=len(schema), batch=True, batch_info=True,
                                 dtype=dtypes, layout=layouts)
        x = {out.name: fed[i] for i, out in enumerate(schema)}  # by declared name (AutoGraph: no zip)
        decoded = video_decoder == "torchcodec"  # the source gives frames, not bytes + frame indices
        if train:
            video = _video_graph(x["video"], x.get("frame_indices"), spec, device, (x["crop_start"], x["crop_shape"]),
                                 x["flip"], rand_augment=x.get("rand_augment"),
                                 erase=(x.get("erase_anchor"), x.get("erase_shape")), decoded=decoded)
            audio = _audio_graph(x["audio"], spec, device, x["audio_position"], x.get("audio_gain"))
        else:
            video = _video_graph(x["video"], x.get("frame_indices"), spec, device, crop_position=x["crop_position"],
                                 decoded=decoded)
            audio = _audio_graph(x["audio"], spec, device)
        label, index = x["label"], x["index"]
        return video, audio, label, index

    return av_pipeline(), source


class AVLoader(DALIGenericIterator):
    """PyTorch iterator over one rank's share of a manifest; yields one dict per batch.

    ``{"video": float32 [B, 3, T, S, S], "audio": float32 [B, 1, audio_frames, audio_bins],
    "label": int64 [B] (class; -1 when unlabelled) or float32 [B, L] (regression), "index": int64 [B]
    (manifest row; -1 marks a FILL padding sample)}``. ``video``/``audio`` live on the pipeline's
    device, ``label``/``index`` on the CPU. ``len()`` is the number of batches per epoch; iterating
    again starts the next epoch (new shuffle). Consume whole epochs: DALI cannot restart an epoch
    half-way (a new ``iter()`` mid-epoch continues where it stopped).
    """

    def __init__(self, pipeline: Pipeline, source: ClipSource) -> None:
        self.source = source
        super().__init__([pipeline], list(OUTPUT_NAMES), auto_reset=True)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def manifest(self) -> Manifest:
        return self.source.manifest

    def __next__(self) -> dict[str, torch.Tensor]:
        return super().__next__()[0]


def build_loader(
    manifest: Manifest | str | Path,
    batch_size: int,
    train: bool,
    device: str = "gpu",
    num_threads: int | None = None,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    spec: ClipSpec | None = None,
    last_batch_policy: LastBatchPolicy | None = None,
    device_id: int | None = None,
    start_epoch: int = 0,
    view: EvalView | tuple[int, int, int, int] | None = None,
    bad_clips: str = "error",
    max_bad_clip_fraction: float = 0.0,
    start_batch: int = 0,
    video_decoder: str = "dali",
) -> AVLoader:
    """Build the pipeline (:func:`build_pipeline`, same arguments) and wrap it in an :class:`AVLoader`.

    For DeepSpeed: ``shard_id=rank, num_shards=world_size``, the same ``seed`` everywhere; the default
    policies give every rank ``len(loader)`` steps per epoch (DROP in training, FILL in evaluation).
    ``num_threads`` defaults to min(4, CPU count). The first batch is prepared here, so an unreadable
    or undecodable first clip fails at construction.
    """
    threads = min(4, os.cpu_count() or 1) if num_threads is None else num_threads
    pipe, source = build_pipeline(manifest, batch_size, train, device, threads, seed, shard_id, num_shards,
                                  spec, last_batch_policy, device_id, start_epoch, view=view, bad_clips=bad_clips,
                                  max_bad_clip_fraction=max_bad_clip_fraction, start_batch=start_batch,
                                  video_decoder=video_decoder)
    return AVLoader(pipe, source)


def denormalize_video(video: torch.Tensor, spec: ClipSpec | None = None) -> torch.Tensor:
    """Undo the video normalisation: [..., 3, T, H, W] → pixel values in [0, 255] (float)."""
    spec = spec or ClipSpec()
    shape = (3, 1, 1, 1)
    mean = torch.tensor(spec.video_mean, device=video.device).view(shape) * 255
    std = torch.tensor(spec.video_std, device=video.device).view(shape) * 255
    return video * std + mean


def normalize_fbank(fbank: torch.Tensor | np.ndarray, spec: ClipSpec | None = None):
    """``(fbank - audio_mean) / audio_std`` — the audio normalisation the pipeline applies."""
    spec = spec or ClipSpec()
    return (fbank - spec.audio_mean) / spec.audio_std
