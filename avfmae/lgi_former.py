"""The improved LGI-Former (paper §3.3, eqs. 4–7) and its per-modality encoder stack.

A layer works on local tokens ``x [B, K, Z, C]`` (K regions of Z tokens each; Z = all tokens of a
region in fine-tuning, the visible ones in pre-training) and region tokens ``s [B, K, C]``:

    I    h_i = cat(s_i, x_i);  h_i += MHSA(LN(h_i))             attention inside each region (G = K)
    II   s   += MHSA(LN(s))                                      over the K region tokens
    III  x   += MHCA(LN(x), LN(s))                               all K*Z local tokens read the regions
    IV   s   += MHCA(LN(s), LN(x))                               region tokens read all local tokens
    then one shared MLP, h += MLP(LN(h)), over local and region tokens.

All four attentions are ``mae_kernels.grouped_attention`` calls fed by fused projections.

Token order: the encoder consumes and emits tokens *region-major* (region 0's tokens, then region
1's, ...; raster order inside a region). ``EncoderOutput.order`` lists the raster position of every
emitted token in that order; it is the ``enc_idx`` to hand to ``assemble_decoder_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from .config import ModelConfig
from .embed import CubeEmbed, PatchEmbed, sinusoid_table
from .layers import (
    Attention,
    Checkpointed,
    CrossAttention,
    DropPath,
    LayerNorm,
    LearnedTokens,
    Mlp,
    stochastic_depth,
)
from .masking import region_index, region_major, sample_pretrain_masks


class EncoderOutput(NamedTuple):
    """What an encoder hands on (a NamedTuple so DeepSpeed ZeRO-3's hooks can see its tensors).

    tokens:  [B, M, C] final local tokens after the encoder's LayerNorm, in emitted order.
    order:   [B, M] int64 raster position of each emitted token (the decoder's ``enc_idx``).
    hidden:  normalised local tokens [B, M, C] of the requested layers, in the requested order.
    regions: [B, K, L, C] normalised region tokens of all L layers (LGI encoders, when requested).
    """

    tokens: torch.Tensor
    order: torch.Tensor
    hidden: list[torch.Tensor]
    regions: torch.Tensor | None = None


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(G, Lq, Lk) of every ``grouped_attention`` call an LGI layer makes, by stage, modality and task
    (pre-training: each region's visible tokens, as the mask sampler keeps them; fine-tuning: all).
    The kernel tests and the kernel-resource checks take their shapes from here."""
    masks = sample_pretrain_masks(cfg, 1, torch.Generator().manual_seed(0))
    shapes = {}
    for modality, K, visible, total in (
            ("video", cfg.num_video_regions, masks.video_visible.shape[1], cfg.num_video_tokens),
            ("audio", cfg.num_audio_regions, masks.audio_visible.shape[1], cfg.num_audio_tokens)):
        shapes[f"II-{modality}"] = (1, K, K)
        for task, tokens in (("pretrain", visible), ("finetune", total)):
            Z = tokens // K
            shapes[f"I-{modality}-{task}"] = (K, Z + 1, Z + 1)  # the region token, then its local tokens
            shapes[f"III-{modality}-{task}"] = (1, K * Z, K)
            shapes[f"IV-{modality}-{task}"] = (1, K, K * Z)
    return shapes


class LGILayer(nn.Module):
    """One improved LGI-Former layer: stages I–IV and the shared MLP (``stage_iv=False``: the vanilla
    LGI block of MAE-DFER, stages I–III, Table 4's middle row)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6, stage_iv: bool = True) -> None:
        super().__init__()
        self.stage_iv = stage_iv
        self.local_norm = LayerNorm(dim, eps)                   # I
        self.local_attn = Attention(dim, num_heads, qkv_bias)
        self.region_norm = LayerNorm(dim, eps)                  # II
        self.region_attn = Attention(dim, num_heads, qkv_bias)
        self.l2r_norm_q = LayerNorm(dim, eps)                   # III
        self.l2r_norm_kv = LayerNorm(dim, eps)
        self.l2r_attn = CrossAttention(dim, num_heads, qkv_bias)
        if stage_iv:
            self.r2l_norm_q = LayerNorm(dim, eps)               # IV
            self.r2l_norm_kv = LayerNorm(dim, eps)
            self.r2l_attn = CrossAttention(dim, num_heads, qkv_bias)
        self.mlp_norm = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, s: torch.Tensor,
                update_regions: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, K, Z, C], s [B, K, C] -> updated (x, s), same shapes.

        ``update_regions=False`` skips stage IV and the region tokens' MLP (their result would be
        discarded: the encoder's last layer when only local tokens are wanted); s is then returned
        as left by stage II.
        """
        K, Z = x.shape[1], x.shape[2]
        dp = self.drop_path
        # I: self-attention inside each region over (region token, its local tokens)   [B, K, Z+1, C]
        h = torch.cat([s.unsqueeze(2), x], dim=2)
        h = h + dp(self.local_attn(self.local_norm(h)))
        s = h[:, :, 0].unsqueeze(1)                                   # [B, 1, K, C]
        x = rearrange(h[:, :, 1:], "b k z c -> b 1 (k z) c")          # [B, 1, K*Z, C]
        # II: region tokens exchange information across regions
        s = s + dp(self.region_attn(self.region_norm(s)))
        # III: local tokens read the globally informed region tokens
        x = x + dp(self.l2r_attn(self.l2r_norm_q(x), self.l2r_norm_kv(s)))
        if not update_regions:
            x = x + dp(self.mlp(self.mlp_norm(x)))
            return rearrange(x, "b 1 (k z) c -> b k z c", k=K), s[:, 0]
        # IV: region tokens read every local token (holistic view)
        if self.stage_iv:
            s = s + dp(self.r2l_attn(self.r2l_norm_q(s), self.r2l_norm_kv(x)))
        # shared MLP over local and region tokens                                      [B, 1, K*Z+K, C]
        h = torch.cat([x, s], dim=2)
        h = h + dp(self.mlp(self.mlp_norm(h)))
        return rearrange(h[:, 0, :K * Z], "b (k z) c -> b k z c", k=K), h[:, 0, K * Z:]


class LGIEncoder(Checkpointed, nn.Module):
    """Embedding + fixed positions + region tokens + ``depth`` LGI layers + final LayerNorm.

    ``modality`` is "video" (cube embedding, regions ``cfg.video_region``) or "audio" (patch
    embedding, regions ``cfg.audio_region``). The positional table, the region map and the full
    region-major order are buffers; the region tokens are read only inside ``forward``.
    """

    def __init__(self, cfg: ModelConfig, modality: str) -> None:
        super().__init__()
        if modality == "video":
            self.embed: nn.Module = CubeEmbed(cfg.embed_dim, cfg.tubelet, cfg.patch_size)
            grid, region = cfg.video_grid, cfg.video_region
        elif modality == "audio":
            self.embed = PatchEmbed(cfg.embed_dim, cfg.audio_patch)
            grid, region = cfg.audio_grid, cfg.audio_region
        else:
            raise ValueError(f"modality must be 'video' or 'audio', got {modality!r}")
        self.modality = modality
        self.grid = grid
        self.num_tokens = math.prod(grid)
        self.num_regions = cfg.num_video_regions if modality == "video" else cfg.num_audio_regions
        self.checkpoint_activations = cfg.checkpoint_activations
        self.register_buffer("pos", sinusoid_table(self.num_tokens, cfg.embed_dim), persistent=False)
        region_of = region_index(grid, region)
        self.register_buffer("region_of", region_of, persistent=False)
        self.register_buffer("full_order", torch.argsort(region_of * self.num_tokens
                                                         + torch.arange(self.num_tokens)), persistent=False)
        self.region_tokens = LearnedTokens(self.num_regions, cfg.embed_dim)
        rates = stochastic_depth(cfg.drop_path, cfg.depth)
        self.layers = nn.ModuleList(
            LGILayer(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, rates[i], cfg.norm_eps,
                     stage_iv=cfg.lgi == "improved")
            for i in range(cfg.depth))
        self.norm = LayerNorm(cfg.embed_dim, cfg.norm_eps)

    def emitted_order(self, visible: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, M] raster positions in the order the encoder emits them (region-major)."""
        if visible is None:
            return self.full_order.expand(batch, -1)
        return region_major(visible, self.region_of, self.num_regions)

    def forward(self, inputs: torch.Tensor, visible: torch.Tensor | None = None,
                hidden_layers: Sequence[int] = (), return_regions: bool = False) -> EncoderOutput:
        """Encode ``inputs`` (video [B, 3, T, H, W] or audio [B, 1, T_a, F]).

        visible: optional [B, M] raster positions to keep (region-aware mask, any order); all tokens
            when None. hidden_layers: 0-based layers whose normalised local tokens to return.
        """
        B = inputs.shape[0]
        order = self.emitted_order(visible, B)
        # only the kept patches are embedded (the masked ones would be dropped right away), and in the
        # order the layers want them
        x = self.embed(inputs, order)                                          # [B, K*Z, C]
        x = x + self.pos.to(x.dtype)[order]
        x = rearrange(x, "b (k z) c -> b k z c", k=self.num_regions)           # [B, K, Z, C]
        s = self.region_tokens(x.dtype).expand(B, -1, -1)                      # [B, K, C]
        hidden: dict[int, torch.Tensor] = {}
        regions = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # the last layer's region-token update only matters when region tokens are returned
            x, s = self.run(layer, x, s, return_regions or i < last)
            if i in hidden_layers:
                hidden[i] = self.norm(rearrange(x, "b k z c -> b (k z) c"))
            if return_regions:
                regions.append(s)
        out = hidden[last] if last in hidden else self.norm(rearrange(x, "b k z c -> b (k z) c"))
        stacked = self.norm(torch.stack(regions, dim=2)) if return_regions else None  # [B, K, L, C]
        return EncoderOutput(out, order, [hidden[i] for i in hidden_layers], stacked)
