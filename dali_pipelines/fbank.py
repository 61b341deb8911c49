"""Kaldi-compatible log mel filter bank in plain torch: the audio reference, and the baseline's features.

HiCMAE (and AudioMAE before it) computes its audio input with
``torchaudio.compliance.kaldi.fbank(waveform - waveform.mean(), htk_compat=True, sample_frequency=16000,
use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)``.
torchaudio is not a dependency of this project, so :func:`kaldi_fbank` re-implements those Kaldi
defaults from Kaldi's documented algorithm:

* frames of 25 ms every 10 ms, only frames that fit inside the signal (Kaldi's ``snip_edges=true``);
* per frame: remove the frame's mean (DC offset), pre-emphasis ``x[n] -= 0.97 x[n-1]`` (``x[0]`` uses
  itself), multiply by the window, zero-pad to the next power of two (512), power spectrum;
* mel triangles spaced and shaped *linearly in mel* (``mel = 1127 ln(1 + f / 700)``) between 20 Hz and
  Nyquist, evaluated at the FFT bins below Nyquist;
* natural log of the filter energies, floored at float32 epsilon.

With ``use_energy=False`` the ``htk_compat`` flag changes nothing, so it has no parameter here.

DALI's ``mel_filter_bank`` differs on purpose-built points (no per-frame DC removal or per-frame
pre-emphasis, triangles linear in Hz); :mod:`dali_pipelines.pipeline` chooses DALI arguments that come
close and ``tests/test_data_fbank.py`` bounds the remaining difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import FBANK_WINDOW, FRAME_LENGTH_MS, FRAME_SHIFT_MS, MEL_LOW_HZ, PREEMPHASIS

WINDOWS = ("hanning", "povey", "hamming", "rectangular")
# Kaldi floors filter energies at the float32 machine epsilon before the log.
LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor:
    """Kaldi's (HTK's) mel scale, ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def kaldi_window(kind: str, length: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Kaldi's analysis windows (all symmetric: the cosine runs over ``length - 1``)."""
    if kind not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {kind!r}")
    n = torch.arange(length, dtype=torch.float64)
    cosine = torch.cos(2 * math.pi * n / (length - 1))
    if kind == "hanning":
        w = 0.5 - 0.5 * cosine
    elif kind == "povey":
        w = (0.5 - 0.5 * cosine) ** 0.85
    elif kind == "hamming":
        w = 0.54 - 0.46 * cosine
    else:
        w = torch.ones(length, dtype=torch.float64)
    return w.to(dtype)


def kaldi_mel_banks(
    num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Kaldi's triangular mel filters as a matrix [num_bins, n_fft // 2 + 1] (float64).

    ``high_freq <= 0`` is an offset from Nyquist, as in Kaldi. The Nyquist column is always zero:
    Kaldi evaluates the triangles on the ``n_fft // 2`` bins below it.
    """
    nyquist = sample_rate / 2
    high = nyquist + high_freq if high_freq <= 0 else high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got low_freq={low_freq}, high={high}")
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    step = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + step * torch.arange(num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = mel_scale(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[None, :]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    weights = torch.where(bin_mel <= centre, rising, falling)
    weights = torch.where((bin_mel > left) & (bin_mel < right), weights, torch.zeros_like(weights))
    return F.pad(weights, (0, 1))


def mel_bin_centres(
    num_bins: int = 128, sample_rate: float = 16000, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Centre frequencies (Hz, float64 [num_bins]) of :func:`kaldi_mel_banks`' triangles."""
    high = sample_rate / 2 + high_freq if high_freq <= 0 else high_freq
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    centres = mel_low + (mel_high - mel_low) / (num_bins + 1) * torch.arange(1, num_bins + 1)
    return 700.0 * torch.expm1(centres / 1127.0)


def frame_signal(waveform: torch.Tensor, frame_length: int, frame_shift: int) -> torch.Tensor:
    """[N] → [T, frame_length] with T = 1 + (N - frame_length) // frame_shift (0 if N < frame_length)."""
    if waveform.numel() < frame_length:
        return waveform.new_zeros((0, frame_length))
    return waveform.unfold(0, frame_length, frame_shift)


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = FRAME_LENGTH_MS,
    frame_shift_ms: float = FRAME_SHIFT_MS,
    window: str = FBANK_WINDOW,
    preemphasis: float = PREEMPHASIS,
    remove_dc_offset: bool = True,
    low_freq: float = MEL_LOW_HZ,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Log mel filter bank energies as Kaldi (``compute-fbank-feats``) computes them, dither 0.

    Args:
        waveform: [N] or [1, N] float tensor, one channel (values as loaded, e.g. in [-1, 1]).
        sample_rate, num_mel_bins, frame_length_ms, frame_shift_ms, window, preemphasis,
            remove_dc_offset, low_freq, high_freq: Kaldi's options of the same names.

    Returns:
        [T, num_mel_bins] tensor of ``waveform``'s dtype, T = 1 + (N - frame_length) // frame_shift.
        Not differentiable in any useful sense (the floor); it is a data-side reference.
    """
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1 or not waveform.is_floating_point():
        raise ValueError(f"waveform must be a float [N] or [1, N] tensor, got {waveform.dtype} "
                         f"{tuple(waveform.shape)}")
    frame_length = int(sample_rate * frame_length_ms / 1000)
    frame_shift = int(sample_rate * frame_shift_ms / 1000)
    n_fft = 1 << (frame_length - 1).bit_length()

    frames = frame_signal(waveform, frame_length, frame_shift)  # [T, L]
    if frames.shape[0] == 0:
        return waveform.new_zeros((0, num_mel_bins))
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis:
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * previous
    frames = frames * kaldi_window(window, frame_length, waveform.dtype)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # [T, n_fft/2 + 1]
    banks = kaldi_mel_banks(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).to(waveform.dtype)
    return power.matmul(banks.T).clamp_min(LOG_FLOOR).log()
