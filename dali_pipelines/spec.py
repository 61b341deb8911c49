"""What one sample looks like (:class:`ClipSpec`, :class:`EvalView`), how a loader runs (:class:`LoaderOptions`)
and the normalisation constants; no DALI, no media libraries.

The one owner of the input geometry: the model's defaults (``avfmae.config.ModelConfig``) are
:class:`ClipSpec`'s, and the spec a run loads with is derived from its model config
(:meth:`ClipSpec.for_model`, the fields of :data:`MODEL_GEOMETRY`, same names on both sides). Kept free
of DALI, PyAV and soundfile so the model, the PyAV baseline, the manifest tools and the CLIs import it
where only the core dependencies are installed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from mae_kernels.integrations.videomae import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from mae_kernels.integrations.videomae import IMAGENET_DEFAULT_STD as IMAGENET_STD

from .augment import RandAugmentSpec

if TYPE_CHECKING:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

# AudioMAE's AudioSet fbank statistics, which HiCMAE reuses; both normalise as (x - mean) / (2 * std).
HICMAE_FBANK_MEAN = -4.2677393
HICMAE_FBANK_STD = 4.5689974
AUDIO_MEAN = HICMAE_FBANK_MEAN
AUDIO_STD = 2 * HICMAE_FBANK_STD  # the divisor actually applied: (fbank - AUDIO_MEAN) / AUDIO_STD
# IMAGENET_MEAN / IMAGENET_STD (imported above): owned by mae_kernels, the lowest layer, which installs on its own
# and so cannot import them from here; VideoMAE's target unnormalises with the same (timm's) statistics.
# HiCMAE's Kaldi fbank options (its dataset's torchaudio.compliance.kaldi.fbank call, and Kaldi's defaults it
# keeps): dali_pipelines.fbank's defaults and the DALI graph both read them here
FRAME_LENGTH_MS = 25
FRAME_SHIFT_MS = 10
FBANK_WINDOW = "hanning"
PREEMPHASIS = 0.97
MEL_LOW_HZ = 20.0
DEVICES = ("gpu", "cpu")
VIDEO_DECODERS = ("dali", "torchcodec")
BAD_CLIP_POLICIES = ("error", "skip")
# the fields a sample shares with the model it feeds (avfmae.config.ModelConfig has them, same names)
MODEL_GEOMETRY = ("num_frames", "image_size", "audio_frames", "audio_bins")


@dataclass(frozen=True)
class ClipSpec:
    """What one sample looks like. Defaults are the model's shapes (DESIGN "Shapes").

    Video: ``num_frames`` frames ``frame_stride`` apart, ``image_size`` square, normalised with
    ``video_mean``/``video_std`` (fractions of 255). Training crops a random area fraction in
    ``crop_area`` with aspect ratio in ``crop_aspect`` (the default 0.44–1 is VideoMAE's multi-scale
    crop of 0.66–1 per side) and flips with probability 0.5 when ``flip``.
    Audio: ``sample_rate`` mono, ``audio_bins`` Kaldi-style log mel bins over ``audio_frames`` 10 ms
    frames (zero-padded before normalisation, as HiCMAE), normalised as ``(x - audio_mean) / audio_std``.
    """

    num_frames: int = 16
    frame_stride: int = 4
    image_size: int = 160
    audio_frames: int = 256
    audio_bins: int = 128
    sample_rate: int = 16000
    audio_mean: float = AUDIO_MEAN
    audio_std: float = AUDIO_STD
    video_mean: tuple[float, float, float] = IMAGENET_MEAN
    video_std: tuple[float, float, float] = IMAGENET_STD
    crop_area: tuple[float, float] = (0.44, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    # training augmentations beyond crop/flip (all off by default; see dali_pipelines.augment)
    rand_augment: RandAugmentSpec | None = None
    erase_prob: float = 0.0
    erase_count: int = 1
    audio_gain: bool = False

    def __post_init__(self) -> None:
        for name in ("num_frames", "frame_stride", "image_size", "audio_frames", "audio_bins", "sample_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive int, got {value!r}")
        if self.window_step < 1:
            raise ValueError(f"ClipSpec.sample_rate {self.sample_rate} Hz leaves no sample per {FRAME_SHIFT_MS} ms "
                             f"fbank step; expected >= {1000 // FRAME_SHIFT_MS} (16000 as shipped)")
        if self.audio_std <= 0:
            raise ValueError(f"ClipSpec.audio_std must be > 0, got {self.audio_std}")
        if len(self.video_mean) != 3 or len(self.video_std) != 3 or min(self.video_std) <= 0:
            raise ValueError(f"ClipSpec.video_mean/video_std must be 3 values (std > 0), got "
                             f"{self.video_mean}, {self.video_std}")
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ClipSpec.crop_area must satisfy 0 < low <= high <= 1, got {self.crop_area}")
        if not 0 < self.crop_aspect[0] <= self.crop_aspect[1]:
            raise ValueError(f"ClipSpec.crop_aspect must satisfy 0 < low <= high, got {self.crop_aspect}")
        if self.rand_augment is not None and not isinstance(self.rand_augment, RandAugmentSpec):
            raise ValueError(f"ClipSpec.rand_augment must be a RandAugmentSpec or None (see "
                             f"RandAugmentSpec.parse), got {self.rand_augment!r}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"ClipSpec.erase_prob must lie in [0, 1], got {self.erase_prob}")
        if not isinstance(self.erase_count, int) or isinstance(self.erase_count, bool) or self.erase_count < 1:
            raise ValueError(f"ClipSpec.erase_count must be a positive int, got {self.erase_count!r}")

    @classmethod
    def for_model(cls, model, **fields) -> ClipSpec:
        """The spec whose samples fit ``model`` (an ``avfmae.config.ModelConfig``, or anything with the
        :data:`MODEL_GEOMETRY` attributes): its geometry, the other fields from ``fields`` or the defaults."""
        clash = sorted(set(fields) & set(MODEL_GEOMETRY))
        if clash:
            raise ValueError(f"ClipSpec.for_model takes {clash} from the model config; change them there")
        return cls(**{name: getattr(model, name) for name in MODEL_GEOMETRY}, **fields)

    @property
    def window_length(self) -> int:
        return self.sample_rate * FRAME_LENGTH_MS // 1000

    @property
    def window_step(self) -> int:
        return self.sample_rate * FRAME_SHIFT_MS // 1000


@dataclass(frozen=True)
class EvalView:
    """One test view of every clip: temporal window ``clip_index`` of ``num_clips`` and spatial crop
    ``crop_index`` of ``num_crops`` (VideoMAE/HiCMAE's test protocol, e.g. 2 clips x 2 crops).

    * Temporal: ``num_clips`` windows evenly spaced over the clip's frames (:func:`sample_frame_indices`);
      one clip is the centred window.
    * Spatial: after the shorter side is resized to ``image_size``, ``num_crops`` square crops evenly
      spaced along the longer side — the crop's offset is the fraction ``crop_index / (num_crops - 1)``
      of the pixels left over (HiCMAE's ``split_nb * (L - S) / (num_crop - 1)``; DALI turns the
      fraction into pixels); one crop is the centre crop.
    * Audio: every view takes the centred audio window. HiCMAE instead cuts the audio to the span of
      each temporal window; here the audio input is the same for all views of a clip.

    Views are averaged by the caller (softmax scores per view, then the mean; see avfmae.trainer).
    """

    clip_index: int = 0
    num_clips: int = 1
    crop_index: int = 0
    num_crops: int = 1

    def __post_init__(self) -> None:
        for name in ("clip_index", "num_clips", "crop_index", "num_crops"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"view.{name} must be an int, got {value!r}")
        for index, count in (("clip_index", "num_clips"), ("crop_index", "num_crops")):
            n, i = getattr(self, count), getattr(self, index)
            if n < 1 or not 0 <= i < n:
                raise ValueError(f"view: need {count} >= 1 and 0 <= {index} < {count}, got {index}={i}, "
                                 f"{count}={n}")

    @classmethod
    def of(cls, view: EvalView | tuple[int, int, int, int]) -> EvalView:
        """An :class:`EvalView` from itself or a tuple (clip_index, num_clips, crop_index, num_crops)."""
        if isinstance(view, cls):
            return view
        if not isinstance(view, (tuple, list)) or len(view) != 4:
            raise ValueError(f"view must be an EvalView or (clip_index, num_clips, crop_index, num_crops), "
                             f"got {view!r}")
        return cls(*view)

    @property
    def crop_position(self) -> float:
        """Where the crop sits along the longer side, as a fraction of the pixels left over."""
        return 0.5 if self.num_crops == 1 else self.crop_index / (self.num_crops - 1)


CENTRE_VIEW = EvalView()


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class LoaderOptions:
    """How one rank's loader runs: the options ``build_pipeline`` and ``build_loader`` share (both take
    ``options`` and keyword overrides of its fields). Checked here, where they are made; what depends on
    the machine (CUDA, torchcodec) and on the manifest (``start_batch``'s upper bound) when the pipeline
    is built.

    Attributes:
        device: "gpu" (NVDEC + GPU operators; outputs on ``cuda:device_id``) or "cpu" (DALI decodes
            VP8/VP9/MJPEG; see ``video_decoder``).
        num_threads: DALI's CPU worker threads, and torchcodec's decoding threads; None: min(4, CPU count).
        seed: shuffling and every augmentation choice; use the same on every rank.
        shard_id, num_shards: this rank's slice of every epoch (rank, world size).
        spec: sample sizes, normalisation and augmentations (:class:`ClipSpec`; None: the model's shapes).
        last_batch_policy: a DALI ``LastBatchPolicy`` (see :mod:`dali_pipelines.source`); None:
            ``default_policy`` (DROP in training, FILL in multi-rank evaluation, else PARTIAL).
        device_id: CUDA device for device="gpu" (None: the current one).
        start_epoch: the epoch of the first pass, for resuming: clip order, frames, crops, flips and audio
            windows are exactly those an uninterrupted run sees in that epoch (each a function of seed,
            epoch and manifest row only, whatever the sharding, batch size or threads).
        start_batch: resuming mid-epoch: the first pass starts at this batch of ``start_epoch`` (the
            batches before it are neither read nor decoded); later epochs are whole.
        prefetch_queue_depth: batches DALI prepares ahead.
        view: evaluation only: the test view (:class:`EvalView` or (clip_index, num_clips, crop_index,
            num_crops)); None: centred window, centre crop.
        bad_clips: "error": a clip that fails the decode-time checks (empty, undecodable, truncated, too
            few frames, NaN/inf audio; ``source.check_clip``) raises ``source.BadClipError`` naming the
            file, the reason and the fix; "skip": it is logged and the next usable row stands in, until
            more than ``max_bad_clip_fraction`` of this rank's share is bad.
        video_decoder: "dali" (NVDEC with device="gpu", VP8/VP9/MJPEG with "cpu") or, with device="cpu",
            "torchcodec": the external source decodes the frames with torchcodec (any codec FFmpeg has,
            e.g. an H.264 dataset as shipped) and DALI does the rest; see docs/design-notes.md.
    """

    device: str = "gpu"
    num_threads: int | None = None
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    spec: ClipSpec | None = None
    last_batch_policy: LastBatchPolicy | None = None
    device_id: int | None = None
    start_epoch: int = 0
    start_batch: int = 0
    prefetch_queue_depth: int = 2
    view: EvalView | tuple[int, int, int, int] | None = None
    bad_clips: str = "error"
    max_bad_clip_fraction: float = 0.0
    video_decoder: str = "dali"

    def __post_init__(self) -> None:
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, 1)
        for name, low in (("seed", 0), ("shard_id", 0), ("num_shards", 1), ("start_epoch", 0), ("start_batch", 0),
                          ("prefetch_queue_depth", 1)):
            _check_int(name, getattr(self, name), low)
        if self.shard_id >= self.num_shards:
            raise ValueError(f"shard_id must be < num_shards={self.num_shards}, got {self.shard_id}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.video_decoder not in VIDEO_DECODERS:
            raise ValueError(f"video_decoder must be one of {VIDEO_DECODERS}, got {self.video_decoder!r}")
        if self.video_decoder == "torchcodec" and self.device != "cpu":
            raise ValueError("video_decoder='torchcodec' is the CPU path (device='cpu'); with device='gpu' "
                             "DALI decodes on NVDEC")
        if self.bad_clips not in BAD_CLIP_POLICIES:
            raise ValueError(f"bad_clips must be one of {BAD_CLIP_POLICIES}, got {self.bad_clips!r}")
        fraction = self.max_bad_clip_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 <= fraction <= 1:
            raise ValueError(f"max_bad_clip_fraction must be a number in [0, 1], got {fraction!r}")
        spec = ClipSpec() if self.spec is None else self.spec
        if not isinstance(spec, ClipSpec):
            raise TypeError(f"spec must be a ClipSpec, got {type(spec).__name__}")
        object.__setattr__(self, "spec", spec)
        if self.view is not None:
            object.__setattr__(self, "view", EvalView.of(self.view))

    @classmethod
    def of(cls, options: LoaderOptions | None = None, **fields) -> LoaderOptions:
        """``options`` (default: all defaults) with ``fields`` replaced; an unknown field is a TypeError
        naming the valid ones."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a LoaderOptions, got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"unknown loader option(s) {unknown}; LoaderOptions has {names}")
        return dataclasses.replace(options or cls(), **fields)

    @property
    def threads(self) -> int:
        """``num_threads``, or its default min(4, CPU count)."""
        return min(4, os.cpu_count() or 1) if self.num_threads is None else self.num_threads
