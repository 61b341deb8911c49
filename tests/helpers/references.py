"""Reference computations written out independently of the code under test."""

import math

import torch


def norm_pix(x: torch.Tensor, groups: int, eps: float = 1e-6) -> torch.Tensor:
    """The norm-pix target written out here, independently of mae_kernels: per group of P/G contiguous values."""
    g = x.reshape(*x.shape[:-1], groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(x.shape)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of two 0-255 images or clips, in float (uint8 inputs do not wrap)."""
    return 10 * math.log10(255**2 / max(float(((a.float() - b.float()) ** 2).mean()), 1e-12))
