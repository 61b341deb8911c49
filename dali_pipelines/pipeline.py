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
from .source import ClipSource
from .spec import FBANK_WINDOW, MEL_LOW_HZ, PREEMPHASIS, ClipSpec, LoaderOptions

OUTPUT_NAMES = ("video", "audio", "label", "index")
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
    """Kaldi-style normalised fbank [1, audio_frames, F]; the window starts at ``position`` in [0, 1) (a
    fraction of the room + 1 starts that fit; a CPU input in training, the centre 0.5 in evaluation)."""
    wave, _ = fn.decoders.audio(encoded, sample_rate=spec.sample_rate, downmix=True, dtype=types.FLOAT)
    wave = fn.pad(wave, shape=[spec.window_length])  # at least one frame, even for a tiny file
    if gain is not None:
        wave = apply_audio_gain(wave, gain)
    if device == "gpu":
        wave = wave.gpu()
    wave = wave - fn.reductions.mean(wave)  # HiCMAE: waveform - waveform.mean()
    wave = fn.preemphasis_filter(wave, preemph_coeff=PREEMPHASIS)
    power = fn.spectrogram(
        wave, nfft=1 << (spec.window_length - 1).bit_length(), window_length=spec.window_length,
        window_step=spec.window_step, window_fn=kaldi_window(FBANK_WINDOW, spec.window_length).tolist(),
        center_windows=False, power=2, layout="tf",
    )
    mel = fn.mel_filter_bank(
        power, nfilter=spec.audio_bins, sample_rate=spec.sample_rate, freq_low=MEL_LOW_HZ,
        freq_high=spec.sample_rate / 2, mel_formula="htk", normalize=False,
    )
    # natural log floored at eps: ln(x) = ln(10) * log10(x / 1.0); the default reference is the sample max
    logmel = fn.to_decibels(mel, multiplier=math.log(10), reference=1.0, cutoff_db=math.log(LOG_FLOOR))
    length = logmel.shape(dtype=types.INT32)[0]
    room = dmath.max(length - spec.audio_frames, 0)
    # room + 1 starts fit (position < 1 never reached the last with floor(position * room))
    start = fn.cast(dmath.min(dmath.floor(position * (room + 1)), room), dtype=types.INT32)
    logmel = fn.slice(
        logmel, start=fn.stack(start), shape=[spec.audio_frames], axes=[0], out_of_bounds_policy="pad",
        fill_values=0.0,
    )  # [audio_frames, F]; zeros appended to short clips before normalising, as HiCMAE
    audio = (logmel - spec.audio_mean) / spec.audio_std
    return fn.expand_dims(audio, axes=[0], new_axis_names="C")  # [1, audio_frames, F]


def _check_environment(options: LoaderOptions) -> None:
    """What the options need of this machine (LoaderOptions checked the rest where it was made)."""
    if options.device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' needs CUDA, which is not available here; use device='cpu' "
                         "(VP8/VP9/MJPEG videos; see python -m dali_pipelines.transcode)")
    if options.video_decoder == "torchcodec":
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
    manifest: Manifest | str | Path, batch_size: int, train: bool, options: LoaderOptions | None = None, **fields
) -> tuple[Pipeline, ClipSource]:
    """Build (not yet started) the DALI pipeline for one rank and the external source that feeds it.

    Args:
        manifest: a :class:`Manifest` or a manifest path (read and validated here).
        batch_size: clips per batch on this rank.
        train: random temporal start, random-resized crop (torchvision semantics), flip, random audio
            crop and a per-epoch shuffle; otherwise centred windows (or ``view``), centre crop, manifest order.
        options: how the loader runs (:class:`LoaderOptions`: device, threads, seed, sharding, spec,
            resuming, evaluation view, bad clips, video decoder); default all defaults.
        **fields: :class:`LoaderOptions` fields replacing those of ``options``, e.g. ``device="cpu"``.

    Returns:
        (pipeline, source): the pipeline's outputs are video float32 [3, T, S, S], audio float32
        [1, audio_frames, audio_bins], label (int64 [] or float32 [L]) and index (int64 []); ``len(source)``
        is the number of batches per epoch (the first pass has ``options.start_batch`` fewer). Running past
        the epoch raises StopIteration.
    """
    options = LoaderOptions.of(options, **fields)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if options.view is not None and train:
        raise ValueError(f"view={options.view!r} applies to evaluation (train=False); training samples its own "
                         "windows and crops")
    _check_environment(options)
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    policy = options.last_batch_policy
    if policy is None:
        policy = default_policy(train, options.num_shards)
    if not isinstance(policy, LastBatchPolicy):
        raise TypeError(f"last_batch_policy must be a nvidia.dali LastBatchPolicy, got {policy!r}")
    source = ClipSource(manifest, batch_size, train, policy, options)
    shard = f"{options.shard_id}/{options.num_shards}"
    if len(source) == 0:
        raise ValueError(f"shard {shard} of {manifest.path} ({len(manifest)} clips) yields no batch of "
                         f"{batch_size} under {policy.name}; lower batch_size or num_shards")
    if options.start_batch >= len(source):
        raise ValueError(f"start_batch must be an int in [0, {len(source)}) (batches per epoch of shard {shard}), "
                         f"got {options.start_batch!r}")
    spec, device, video_decoder = options.spec, options.device, options.video_decoder
    device_id = options.device_id
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()

    schema = source.outputs  # the source's declared (name, dtype, layout) outputs
    dtypes = [DALI_TYPES[out.dtype] for out in schema]
    layouts = [out.layout for out in schema]

    @pipeline_def(
        batch_size=batch_size, num_threads=options.threads, device_id=device_id if device == "gpu" else None,
        # the source draws every choice; the graph's only random operator is the erasing noise
        seed=options.seed % 2**31, prefetch_queue_depth=options.prefetch_queue_depth,
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
    manifest: Manifest | str | Path, batch_size: int, train: bool, options: LoaderOptions | None = None, **fields
) -> AVLoader:
    """Build the pipeline (:func:`build_pipeline`, same arguments) and wrap it in an :class:`AVLoader`.

    For DeepSpeed: ``shard_id=rank, num_shards=world_size``, the same ``seed`` everywhere; the default
    policies give every rank ``len(loader)`` steps per epoch (DROP in training, FILL in evaluation).
    The first batch is prepared here, so an unreadable or undecodable first clip fails at construction.
    """
    return AVLoader(*build_pipeline(manifest, batch_size, train, options, **fields))


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
