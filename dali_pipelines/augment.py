"""Training augmentations of the reference recipe beyond crop and flip: RandAugment and random erasing
(fine-tuning video) and the audio magnitude ("roll/mag") augmentation.

Each has two halves, like the other augmentations of this package: the random choices are drawn per
clip in the external source from the clip's ``(seed, epoch, row)`` generator (``sample_*``, plain
numpy), and DALI operators apply them (``apply_*``, graph side). One choice per clip: every frame of a
clip gets the same RandAugment operations and the same erased box.

What the reference does (github.com/XuecWu/AVF-MAE, read for this module, not copied):

* RandAugment ``rand-m7-n4-mstd0.5-inc1`` (``run_class_finetuning_av.py`` ``--aa``; VideoMAE's
  ``video_transforms.create_random_augment``, one random choice for the whole frame list): 4 operations
  per clip from timm's "increasing" suite, magnitude 7 of 10 drawn each time from N(7, 0.5). Here: DALI's
  own operators and suite (``nvidia.dali.auto_aug``: ``get_rand_augment_suite`` — monotonic magnitudes,
  the same ranges as timm's for rotate 30°, shear 0.3, translate 0.45 of the side, enhance 0.9; it has
  Identity and lacks timm's Invert and SolarizeAdd), 11 magnitude bins (0..10), the magnitude drawn from
  N(m, mstd) and rounded to a bin, each signed operation negated with probability 1/2. Applied to the
  cropped, resized frames (the reference augments before its random-resized crop; translations are
  relative to the frame, so the order changes little).
* Random erasing (``--reprob 0.25 --remode pixel --recount 1``; ``random_erasing.py`` with ``cube``):
  with probability ``prob`` one box per clip — the same for every frame — of area uniform in
  [0.02, 1/3] of the frame (divided by the count) and aspect ratio log-uniform in [0.3, 1/0.3], up to
  100 tries, filled with standard-normal noise in the normalised space (new noise per pixel and frame).
  The box is a function of (seed, epoch, row); the noise values come from DALI's seeded generator, so a
  resumed run erases the same box with other noise.
* Audio ``--roll_mag_aug``: the reference rolls the waveform by ``randint(len(waveform))`` — always 0,
  since the waveform is a [1, L] array — then multiplies it by Beta(10, 10) + 0.5. Only the magnitude
  acts, and only it is implemented (``audio_gain``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# DALI is imported where a suite or graph is built: the manifest tools import this module without it

ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_TRIES = 100
GAIN_BETA = 10.0  # audio magnitude: Beta(10, 10) + 0.5
_RAND_AUGMENT = re.compile(r"^rand(-(m|n|mstd|inc)[0-9.]+)*$")


@dataclass(frozen=True)
class RandAugmentSpec:
    """``n`` operations per clip at magnitude ``m`` of ``bins - 1`` (with std ``mstd``); ``increasing``:
    DALI's monotonic suite (timm's ``inc1``), else its non-monotonic one."""

    n: int = 2
    m: int = 9
    mstd: float = 0.0
    increasing: bool = True
    bins: int = 11

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"rand_augment: n must be a positive int, got {self.n!r}")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"rand_augment: bins must be an int >= 2, got {self.bins!r}")
        if not 0 <= self.m < self.bins:
            raise ValueError(f"rand_augment: m must lie in [0, {self.bins - 1}], got {self.m!r}")
        if not (math.isfinite(self.mstd) and self.mstd >= 0):
            raise ValueError(f"rand_augment: mstd must be >= 0, got {self.mstd!r}")

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        """timm's config string, e.g. ``"rand-m7-n4-mstd0.5-inc1"`` (defaults: n 2, m 9, mstd 0, inc 0)."""
        if not isinstance(text, str) or not _RAND_AUGMENT.match(text):
            raise ValueError(f"rand_augment: expected timm's form 'rand-m7-n4-mstd0.5-inc1', got {text!r}")
        values = {"n": 2, "m": 9, "mstd": 0.0, "inc": 0}
        for part in text.split("-")[1:]:
            key = re.match(r"[a-z]+", part).group(0)
            number = part[len(key):]
            try:
                values[key] = float(number) if key == "mstd" else int(number)
            except ValueError as err:
                raise ValueError(f"rand_augment: bad value in {part!r} of {text!r}") from err
        return cls(n=values["n"], m=values["m"], mstd=values["mstd"], increasing=bool(values["inc"]))

    def suite(self, shape: bool = True) -> list:
        """DALI's RandAugment operations (translations relative to the frame when ``shape``)."""
        from nvidia.dali.auto_aug import rand_augment

        if self.increasing:
            return rand_augment.get_rand_augment_suite(use_shape=shape)
        return rand_augment.get_rand_augment_non_monotonic_suite(use_shape=shape)


# --- choices (external source, numpy) ---------------------------------------------------------------


def sample_rand_augment(spec: RandAugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """int32 [3, n]: operation index, sign (1: negate the magnitude) and magnitude bin of each step."""
    ops = rng.integers(0, len(spec.suite()), size=spec.n)
    signs = rng.integers(0, 2, size=spec.n)
    mags = np.full(spec.n, float(spec.m)) if spec.mstd == 0 else rng.normal(spec.m, spec.mstd, size=spec.n)
    mags = np.clip(np.rint(mags), 0, spec.bins - 1)
    return np.stack([ops, signs, mags]).astype(np.int32)


def sample_erase_boxes(prob: float, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """int32 [count, 4]: (top, left, h, w) of each erased box in a ``size`` x ``size`` frame; boxes of
    zero size where nothing is erased (probability 1 - ``prob``, or no fitting box in 100 tries)."""
    boxes = np.zeros((count, 4), np.int32)
    if rng.random() >= prob:
        return boxes
    log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
    for k in range(count):
        for _ in range(ERASE_TRIES):
            target = rng.uniform(*ERASE_AREA) * size * size / count
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if w < size and h < size:
                boxes[k] = (rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w)
                break
    return boxes


def sample_audio_gain(rng: np.random.Generator) -> float:
    """The waveform's magnitude factor, Beta(10, 10) + 0.5 (in [0.5, 1.5], mean 1)."""
    return float(np.float32(rng.beta(GAIN_BETA, GAIN_BETA) + 0.5))


# --- operators (DALI graph) ---------------------------------------------------------------------------


def apply_rand_augment(frames, choices, spec: RandAugmentSpec, size: int):
    """RandAugment on uint8 frames [T, S, S, 3] (layout FHWC): step i applies operation ``choices[0, i]``
    at the signed magnitude bin (``choices[2, i]``, negated when ``choices[1, i]``) to every frame.
    Needs a pipeline with ``enable_conditionals=True``."""
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = spec.suite()
    for i in range(spec.n):
        magnitude = signed_bin(choices[2, i], random_sign=choices[1, i])
        frames = select(suite, choices[0, i], data=frames, magnitude_bin=magnitude, num_magnitude_bins=spec.bins,
                        shape=[size, size], fill_value=128)
    return frames


def apply_random_erasing(video, anchors, shapes):
    """Replace the boxes (``anchors``/``shapes``: float [2k] (y, x) pairs, in pixels) of every frame of
    normalised ``video`` [3, T, S, S] (CFHW) with standard-normal noise."""
    from nvidia.dali import fn, types

    keep = fn.erase(video * 0.0 + 1.0, anchor=anchors, shape=shapes, axis_names="HW", fill_value=0.0)
    noise = fn.random.normal(video, dtype=types.FLOAT)
    return video * keep + noise * (1.0 - keep)


def apply_audio_gain(wave, gain):
    """The waveform times its clip's magnitude factor (a CPU scalar per sample)."""
    return wave * gain
