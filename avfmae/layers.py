"""Transformer building blocks shared by the encoders, decoders and fusion modules.

Every attention runs through ``mae_kernels.grouped_attention`` on tokens laid out as groups:
``x [B, G, L, C]`` attends within each of its G groups (G = K regions for LGI stage I, G = 1 for
ordinary sequences). q/k/v are handed to the kernel as strided views of one fused projection.

DeepSpeed ZeRO-3 rules followed here: a module reads only its *own* parameters, inside its own
``forward`` (the fused qkv weight and biases are direct parameters of the attention module, not of a
child Linear); parameters are initialised inside the ``__init__`` of the module that owns them
(``Linear.reset_parameters``), because ``zero.Init`` partitions them as soon as that ``__init__``
returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from mae_kernels import grouped_attention
from torch import nn
from torch.utils.checkpoint import checkpoint


class Linear(nn.Linear):
    """nn.Linear with Xavier-uniform weights and zero bias (MAE / VideoMAE initialisation)."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LearnedTokens(nn.Module):
    """A table of learned vectors (region tokens, a mask token, layer weights) as a leaf module.

    ZeRO-3 gathers a module's parameters around its own forward and backward; a parameter read
    directly by a big parent module is released again while the parent's children run backward, and
    its gradient then lands on an empty partition. Owning it in a leaf whose forward returns it keeps
    the gather/release pairing exact.
    """

    def __init__(self, count: int, dim: int | None = None, std: float | None = 0.02,
                 fill: float | None = None) -> None:
        super().__init__()
        shape = (count,) if dim is None else (count, dim)
        self.weight = nn.Parameter(torch.empty(shape))
        if fill is not None:
            nn.init.constant_(self.weight, fill)
        else:
            nn.init.trunc_normal_(self.weight, std=std, a=-std, b=std)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight if dtype is None else self.weight.to(dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with the project's default eps (1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) of a residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _qkv_bias(q_bias: torch.Tensor | None, v_bias: torch.Tensor | None) -> torch.Tensor | None:
    """cat(q_bias, 0, v_bias) (or cat(0, v_bias) for a kv projection): k carries no bias, since
    softmax is invariant to it."""
    if v_bias is None:
        return None
    k_bias = torch.zeros_like(v_bias)
    return torch.cat([q_bias, k_bias, v_bias] if q_bias is not None else [k_bias, v_bias])


class Attention(nn.Module):
    """Multi-head self-attention within groups: ``x [B, G, L, C] -> [B, G, L, C]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.xavier_uniform_(self.qkv_weight)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.qkv_weight, _qkv_bias(self.q_bias, self.v_bias))
        q, k, v = rearrange(qkv, "b g l (n h d) -> n b g l h d", n=3, h=self.num_heads)
        out = grouped_attention(q, k, v)  # [B, G, L, H, D]
        return self.proj(rearrange(out, "b g l h d -> b g l (h d)"))


class CrossAttention(nn.Module):
    """Multi-head cross-attention within groups: ``x [B, G, Lq, C]`` attends to ``ctx [B, G, Lk, C]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_weight = nn.Parameter(torch.empty(dim, dim))
        self.kv_weight = nn.Parameter(torch.empty(2 * dim, dim))
        nn.init.xavier_uniform_(self.q_weight)
        nn.init.xavier_uniform_(self.kv_weight)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q = rearrange(F.linear(x, self.q_weight, self.q_bias), "b g l (h d) -> b g l h d", h=self.num_heads)
        kv = F.linear(ctx, self.kv_weight, _qkv_bias(None, self.v_bias))
        k, v = rearrange(kv, "b g l (n h d) -> n b g l h d", n=2, h=self.num_heads)
        out = grouped_attention(q, k, v)
        return self.proj(rearrange(out, "b g l h d -> b g l (h d)"))


class Block(nn.Module):
    """Pre-norm ViT block on a sequence ``x [B, L, C]``: self-attention, then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x).unsqueeze(1)).squeeze(1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """HiCMAE's cross/self block on ``x [B, L, C]`` with context ``ctx [B, Lc, C]``:
    cross-attention to the context, self-attention, MLP (all pre-norm residuals)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.cross_norm_q = LayerNorm(dim, eps)
        self.cross_norm_kv = LayerNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias)
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        cross = self.cross_attn(self.cross_norm_q(x).unsqueeze(1), self.cross_norm_kv(ctx).unsqueeze(1))
        x = x + self.drop_path(cross.squeeze(1))
        x = x + self.drop_path(self.attn(self.norm1(x).unsqueeze(1)).squeeze(1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def stochastic_depth(rate: float, depth: int) -> list[float]:
    """Drop-path probability per layer, rising linearly from 0 to ``rate`` (stochastic depth rule)."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


CheckpointFn = Callable[..., Any]


class Checkpointed:
    """Mixin: ``self.run(layer, *tensors)`` calls the layer, under activation checkpointing when
    ``self.checkpoint_activations`` is set and gradients are being recorded.

    Reentrant mode (``use_reentrant=True``), as DeepSpeed ZeRO-3 needs; ``checkpoint_fn`` may be
    replaced by ``deepspeed.checkpointing.checkpoint`` (same call signature) to get its
    partitioned/CPU-offloaded activations. Positional tensor arguments only (reentrant mode).
    """

    checkpoint_activations: bool = False
    checkpoint_fn: CheckpointFn | None = None

    def run(self, layer: nn.Module, *args: Any) -> Any:
        if self.checkpoint_activations and torch.is_grad_enabled() and getattr(self, "training", False):
            if self.checkpoint_fn is not None:
                return self.checkpoint_fn(layer, *args)
            return checkpoint(layer, *args, use_reentrant=True)
        return layer(*args)
