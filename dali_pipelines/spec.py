"""What one sample looks like (:class:`ClipSpec`) and the normalisation constants; no DALI, no media libraries.

The one owner of the input geometry: the model's defaults (``avfmae.config.ModelConfig``) are
:class:`ClipSpec`'s, and the spec a run loads with is derived from its model config
(:meth:`ClipSpec.for_model`, the fields of :data:`MODEL_GEOMETRY`, same names on both sides). Kept free
of DALI, PyAV and soundfile so the model, the PyAV baseline, the manifest tools and the CLIs import it
where only the core dependencies are installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .augment import RandAugmentSpec

# AudioMAE's AudioSet fbank statistics, which HiCMAE reuses; both normalise as (x - mean) / (2 * std).
HICMAE_FBANK_MEAN = -4.2677393
HICMAE_FBANK_STD = 4.5689974
AUDIO_MEAN = HICMAE_FBANK_MEAN
AUDIO_STD = 2 * HICMAE_FBANK_STD  # the divisor actually applied: (fbank - AUDIO_MEAN) / AUDIO_STD
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
        return self.sample_rate * 25 // 1000

    @property
    def window_step(self) -> int:
        return self.sample_rate * 10 // 1000
