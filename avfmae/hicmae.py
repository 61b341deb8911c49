"""HiCMAE building blocks (paper §3.1): vanilla ViT encoder and HiCMAE's cross-modal fusion encoder.

Used by the HiCMAE baseline (speed reference) and by the Table-4 ablation variant of AVF-MAE++
(``fusion="hicmae"``). Same kernels, same layout conventions as the LGI-Former encoder; the ViT
encoder emits tokens in the order of its ``visible`` index (raster order for sorted masks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .embed import CubeEmbed, PatchEmbed, sinusoid_table
from .layers import Block, Checkpointed, CrossBlock, LayerNorm, stochastic_depth
from .lgi_former import EncoderOutput


class ViTEncoder(Checkpointed, nn.Module):
    """Embedding + fixed positions + ``depth`` global-attention ViT blocks + final LayerNorm."""

    def __init__(self, cfg: ModelConfig, modality: str) -> None:
        super().__init__()
        if modality == "video":
            self.embed: nn.Module = CubeEmbed(cfg.embed_dim, cfg.tubelet, cfg.patch_size)
            grid: tuple[int, ...] = cfg.video_grid
        elif modality == "audio":
            self.embed = PatchEmbed(cfg.embed_dim, cfg.audio_patch)
            grid = cfg.audio_grid
        else:
            raise ValueError(f"modality must be 'video' or 'audio', got {modality!r}")
        self.modality = modality
        self.num_tokens = math.prod(grid)
        self.checkpoint_activations = cfg.checkpoint_activations
        self.register_buffer("pos", sinusoid_table(self.num_tokens, cfg.embed_dim), persistent=False)
        rates = stochastic_depth(cfg.drop_path, cfg.depth)
        self.layers = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, rates[i], cfg.norm_eps)
            for i in range(cfg.depth))
        self.norm = LayerNorm(cfg.embed_dim, cfg.norm_eps)

    def forward(self, inputs: torch.Tensor, visible: torch.Tensor | None = None,
                hidden_layers: Sequence[int] = ()) -> EncoderOutput:
        """Encode the ``visible`` tokens [B, M] (all when None), emitted in the order ``visible`` lists."""
        B = inputs.shape[0]
        order = visible if visible is not None else torch.arange(self.num_tokens, device=inputs.device).expand(B, -1)
        x = self.embed(inputs, order)                                          # [B, M, C]: kept patches only
        x = x + self.pos.to(x.dtype)[order]
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = self.run(layer, x)
            if i in hidden_layers:
                hidden[i] = self.norm(x)
        last = len(self.layers) - 1
        out = hidden[last] if last in hidden else self.norm(x)
        return EncoderOutput(out, order, [hidden[i] for i in hidden_layers])


class HiCMAEFusion(nn.Module):
    """HiCMAE's cross-modal fusion encoder: per modality, ``depth`` blocks of (cross-attention to the
    other modality, self-attention, MLP), both modalities updated in parallel; a final LayerNorm each."""

    def __init__(self, dim: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        rates = stochastic_depth(drop_path, depth)  # 0 -> drop_path across the blocks (HiCMAE's fusion encoder)
        self.video_blocks = nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio, qkv_bias, rates[i], eps)
                                          for i in range(depth))
        self.audio_blocks = nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio, qkv_bias, rates[i], eps)
                                          for i in range(depth))
        self.video_norm = LayerNorm(dim, eps)
        self.audio_norm = LayerNorm(dim, eps)

    def forward(self, f_v: torch.Tensor, f_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_v [B, Lv, C], f_a [B, La, C] -> fused (same shapes)."""
        for video_block, audio_block in zip(self.video_blocks, self.audio_blocks):
            f_v, f_a = video_block(f_v, f_a), audio_block(f_a, f_v)
        return self.video_norm(f_v), self.audio_norm(f_a)
