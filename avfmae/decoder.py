"""Lightweight ViT decoder with HiCMAE's hierarchical skip connections (paper §3.1–3.2, eq. 2).

Input: ``assemble_decoder_tokens`` builds ``cat(proj(enc) + pos[enc_idx], mask_token + pos[dec_idx])``
— the projected encoder tokens at their own positions, followed by one mask token per
decoder-visible position. Block 1 is plain self-attention; block j >= 2 first cross-attends to the
projected (+pos) encoder features of skip layer number (depth - j + 1), deepest first. Only the
mask-token rows are predicted: [B, Md, patch_dim] (1536 values per video token, 256 per audio
token at the default sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mae_kernels import assemble_decoder_tokens, gather_tokens
from torch import nn

from .embed import sinusoid_table
from .layers import Block, Checkpointed, CrossBlock, LayerNorm, LearnedTokens, Linear


class Decoder(Checkpointed, nn.Module):
    """Encoder-to-decoder projection, mask token, fixed positions, ``depth`` blocks, norm and pixel head."""

    def __init__(self, enc_dim: int, dim: int, num_heads: int, depth: int, num_tokens: int, out_dim: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6,
                 checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.encoder_to_decoder = Linear(enc_dim, dim, bias=False)
        self.mask_token = LearnedTokens(dim)
        self.register_buffer("pos", sinusoid_table(num_tokens, dim), persistent=False)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, qkv_bias, eps=eps)]
            + [CrossBlock(dim, num_heads, mlp_ratio, qkv_bias, eps=eps) for _ in range(depth - 1)])
        self.norm = LayerNorm(dim, eps)
        self.head = Linear(dim, out_dim)
        self.checkpoint_activations = checkpoint_activations

    def forward(self, enc: torch.Tensor, enc_idx: torch.Tensor, dec_idx: torch.Tensor,
                skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predict the patches at ``dec_idx``.

        enc: [B, Me, C_enc] encoder (or fusion) tokens; enc_idx: [B, Me] their raster positions in
        that same order; dec_idx: [B, Md] positions that get a mask token; skips: depth - 1 encoder
        feature maps [B, Me, C_enc] (same token order as enc), shallowest first.
        Returns [B, Md, out_dim].
        """
        if len(skips) != len(self.blocks) - 1:
            raise ValueError(f"skips must hold {len(self.blocks) - 1} feature maps (decoder depth - 1), "
                             f"got {len(skips)}")
        if any(f.shape != enc.shape for f in skips):
            raise ValueError(f"skips must match enc's shape {tuple(enc.shape)} (same tokens, same order), "
                             f"got {[tuple(f.shape) for f in skips]}")
        # one projection for the encoder tokens and every skip map: same weight, same token count, so
        # the maps ride as one sequence (one matmul forward, two backward, whatever the depth)
        proj, *projected_skips = self.encoder_to_decoder(torch.cat([enc, *skips], dim=1)).split(
            enc.shape[1], dim=1)                                              # [B, Me, D] each
        pos = self.pos.to(proj.dtype)
        x = assemble_decoder_tokens(proj, self.mask_token(proj.dtype), pos, enc_idx, dec_idx)
        skip_pos = gather_tokens(pos.expand(proj.shape[0], -1, -1), enc_idx)  # [B, Me, D]
        contexts = [f + skip_pos for f in projected_skips]
        for j, block in enumerate(self.blocks):
            x = self.run(block, x) if j == 0 else self.run(block, x, contexts[-j])  # [B, Me+Md, D]
        return self.head(self.norm(x[:, -dec_idx.shape[1]:]))
