"""grouped_attention: softmax attention inside each of G independent groups of tokens.

    out[b, g, i, h] = sum_j softmax_j(scale * q[b, g, i, h] . k[b, g, j, h]) v[b, g, j, h]

The LGI-Former runs four tiny attentions per layer (stage I inside each region, II over region
tokens, III local->region, IV region->local); this op serves all four.

TODO(issue 3): Triton forward/backward kernels packing several small groups per tile. Until they
land, every backend runs the reference below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .dispatch import check_same_device, check_same_dtype, check_tensor

SUPPORTED_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)


# --- reference --------------------------------------------------------------------------------------


def grouped_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """SDPA over (B*G, H) sequences; same contract as grouped_attention."""
    B, G = q.shape[:2]
    fold = "b g l h d -> (b g) h l d"
    out = F.scaled_dot_product_attention(rearrange(q, fold), rearrange(k, fold), rearrange(v, fold),
                                         scale=scale)
    return rearrange(out, "(b g) h l d -> b g l h d", b=B, g=G)


# --- public op --------------------------------------------------------------------------------------


def _check(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 5)
    check_same_device(q=q, k=k, v=v)
    check_same_dtype(q=q, k=k, v=v)
    B, G, Lq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3], k.shape[4]) != (B, G, H, D):
        raise ValueError(f"k/v must be [B={B}, G={G}, Lk, H={H}, D={D}] to match q, got {tuple(k.shape)}")
    if min(B, G, Lq, H, k.shape[2]) == 0:
        raise ValueError(f"empty groups: q {tuple(q.shape)}, k {tuple(k.shape)} (every dim must be >= 1)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive or None, got {scale}")


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """Softmax attention within each group.

    Args:
        q: [B, G, Lq, H, D]; k, v: [B, G, Lk, H, D]; one dtype (float32/float16/bfloat16), one device.
            Strided views are accepted (e.g. slices of one fused qkv projection).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, G, Lq, H, D]. Differentiable in q, k and v.
    """
    _check(q, k, v, scale)
    return grouped_attention_reference(q, k, v, scale)
