"""IAV-CL: Iteratively Audio-Visual Correlations Learning (paper §3.4, eqs. 8–16).

Inputs: per-modality token features ``f_v [B, Lv, C]``, ``f_a [B, La, C]`` (F_m^1) and the
multi-modal feature ``f_av [B, K, 2C]`` (F_av^0, one row per region pair). Fine-tuning feeds the K
region tokens (pooled over layers) and, per region, the concatenated layer-weighted sums (eq. 8);
pre-training feeds the visible local tokens and, per region, ``cat(mean of its visible video tokens,
mean of its visible audio tokens)`` — K rows where the reference code uses one global row (see
``AVFMAEPretrain.fuse``).

* DiER unit (eqs. 9–11), one per iteration, per modality m: a complete self-attention block and a
  complete cross-attention block (query m, key/value the other modality), each attention + FFN,
  run in parallel; channel gates sigma(W [F^s, F^c] + b) weigh and sum them. A LayerNorm closes
  the unit *(reference code; eq. 9 as printed has none)*.
* ER layer (eqs. 12–13), one module shared by all units: F_av^0 is first projected 2C -> C; then a
  parameter-free single-head cross-attention from F_av to each modality's unit output, a 1x1
  Conv1d + BatchNorm + PReLU per modality giving R_m, and F_av <- LN(F_av + R_a + R_v)
  *(reference code: the SHCA has no projections)*.
* HAFE layer (eqs. 14–16): per modality, stack the N_c unit outputs [B, L, N_c, C], unit-level
  MHSA + FFN (attention across units, separately for every token), sigmoid-scored weighted sum
  (eq. 15), then MHCA to F_av^{N_c} + FFN (eq. 16). The MHCA module is shared by both modalities
  *(reference code)*.

Parameter count per unit ~56C^2, ER ~4C^2, HAFE ~44C^2 — see config.py for how this meets the
paper's fine-tuning model sizes.

Stochastic depth *(reference code, modeling_attention_av.py)*: the residual branches of DiER unit i
drop with rate ``drop_path * i / (N_c - 1)`` (0 -> drop_path across the units), those of HAFE with
``drop_path / 2``; the ER layer has none.

Table 5 ablations (``dier=False`` / ``hafe=False``): without DiER units, each iteration is one of
HiCMAE's cross-modal blocks per modality (cross-attention to the other modality, self-attention, MLP;
no gates) and F_av is the projected F_av^0, never refined; without HAFE, the last unit's outputs,
LayerNorm-ed, are the result, the hierarchical integration of HiCMAE's fusion encoder (§4.3: "we deploy
the original fusion modules of HiCMAE"), and the ER layer goes too (only HAFE reads the refined F_av; in
the reference code as well). Both off is HiCMAE's fusion itself (``fusion="hicmae"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import Attention, CrossAttention, CrossBlock, DropPath, LayerNorm, Linear, Mlp, stochastic_depth


class _AttentionBlock(nn.Module):
    """Complete pre-norm attention block on [B, L, C]: self-attention (ctx None) or cross-attention
    to ``ctx``, then an FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float,
                 cross: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.norm_q = LayerNorm(dim, eps)
        self.norm_kv = LayerNorm(dim, eps) if cross else None
        self.attn = CrossAttention(dim, num_heads, qkv_bias) if cross else Attention(dim, num_heads, qkv_bias)
        self.mlp_norm = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x).unsqueeze(1)
        dp = self.drop_path
        if self.norm_kv is None:
            x = x + dp(self.attn(q).squeeze(1))
        else:
            x = x + dp(self.attn(q, self.norm_kv(ctx).unsqueeze(1)).squeeze(1))
        return x + dp(self.mlp(self.mlp_norm(x)))


class GatePair(Linear):
    """Eq. 9's two channel gates, W_s [F^s, F^c] + b_s and W_c [F^s, F^c] + b_c, as one Linear
    ``in_dim -> 2 * out_dim`` (rows: the self gate, then the cross gate): both read the same input, so
    one matmul computes them (one launch forward and two backward instead of two and four). Each half
    is initialised as its own ``in_dim -> out_dim`` Linear would be (Xavier-uniform over that shape)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, 2 * out_dim)

    def reset_parameters(self) -> None:
        for half in self.weight.data.chunk(2, dim=0):
            nn.init.xavier_uniform_(half)
        nn.init.zeros_(self.bias)


_SPLIT_GATES = ("gate_self.", "gate_cross.")  # their names in checkpoints written before GatePair


def merge_split_gates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every DiER unit's ``gate_self.*`` / ``gate_cross.*`` pair (checkpoints written
    before :class:`GatePair`) stacked into ``gates.*``, self gate first; other entries unchanged."""
    merged = dict(state)
    for key in state:
        prefix, sep, param = key.rpartition(_SPLIT_GATES[0])
        pair = [f"{prefix}{name}{param}" for name in _SPLIT_GATES]
        if sep and all(k in merged for k in pair):
            merged[f"{prefix}gates.{param}"] = torch.cat([merged.pop(k) for k in pair])
    return merged


class DenseInteraction(nn.Module):
    """One modality's half of a DiER unit (eqs. 9–11)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.self_block = _AttentionBlock(dim, num_heads, mlp_ratio, qkv_bias, eps, cross=False, drop_path=drop_path)
        self.cross_block = _AttentionBlock(dim, num_heads, mlp_ratio, qkv_bias, eps, cross=True, drop_path=drop_path)
        self.gates = GatePair(2 * dim, dim)
        self.norm = LayerNorm(dim, eps)

    def forward(self, f: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """f [B, L, C] (F_m^1), other [B, L', C] (the other modality) -> F_m^2 [B, L, C]."""
        f_s = self.self_block(f)                       # eq. 10
        f_c = self.cross_block(f, other)               # eq. 11
        f_sc = torch.cat([f_s, f_c], dim=-1)
        gate_s, gate_c = torch.sigmoid(self.gates(f_sc)).chunk(2, dim=-1)
        fused = gate_s * f_s + gate_c * f_c
        return self.norm(fused)                        # eq. 9


class DiERUnit(nn.Module):
    """Dense audio-visual interactions for both modalities, in parallel."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.video = DenseInteraction(dim, num_heads, mlp_ratio, qkv_bias, eps, drop_path)
        self.audio = DenseInteraction(dim, num_heads, mlp_ratio, qkv_bias, eps, drop_path)

    def forward(self, f_v: torch.Tensor, f_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video(f_v, f_a), self.audio(f_a, f_v)


class CrossModalUnit(nn.Module):
    """Table 5's "without DiER" unit: one HiCMAE cross-modal block per modality, both in parallel."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.video = CrossBlock(dim, num_heads, mlp_ratio, qkv_bias, drop_path, eps)
        self.audio = CrossBlock(dim, num_heads, mlp_ratio, qkv_bias, drop_path, eps)

    def forward(self, f_v: torch.Tensor, f_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video(f_v, f_a), self.audio(f_a, f_v)


def _conv_bn_prelu(dim: int) -> nn.Sequential:
    # no conv bias: BatchNorm subtracts it again, so its gradient is zero and Adam would only move it by
    # the sign of rounding noise
    return nn.Sequential(nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), nn.PReLU())


class EvolutionaryRefinement(nn.Module):
    """ER layer (eqs. 12–13), shared by all DiER units.

    BatchNorm in training mode needs more than one value per channel: F_av has K rows per sample (one
    per region pair, in pre-training and fine-tuning alike), so a micro-batch of 1 is fine when K > 1.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.in_proj = Linear(2 * dim, dim)
        self.conv_video = _conv_bn_prelu(dim)
        self.conv_audio = _conv_bn_prelu(dim)
        self.norm = LayerNorm(dim, eps)

    @staticmethod
    def _residual(conv: nn.Module, f_av: torch.Tensor, f_m: torch.Tensor) -> torch.Tensor:
        # single-head cross-attention without projections (head dim C is outside the grouped
        # kernel's supported head dims, and the query is 1-8 tokens: torch SDPA is the right tool)
        attended = F.scaled_dot_product_attention(f_av, f_m, f_m)            # [B, Lav, C]
        return rearrange(conv(rearrange(attended, "b l c -> b c l")), "b c l -> b l c")

    def forward(self, f_av: torch.Tensor, f2_v: torch.Tensor, f2_a: torch.Tensor,
                project: bool = False) -> torch.Tensor:
        """f_av [B, Lav, C] ([B, Lav, 2C] with ``project`` for F_av^0) -> next F_av [B, Lav, C]."""
        if project:
            f_av = self.in_proj(f_av)
        r_v = self._residual(self.conv_video, f_av, f2_v)
        r_a = self._residual(self.conv_audio, f_av, f2_a)
        return self.norm(f_av + r_a + r_v)


class UnitAggregation(nn.Module):
    """One modality's hierarchical aggregation (eqs. 14–15): [B, L, N_c, C] -> [B, L, C]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.norm = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp_norm = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.select = Linear(dim, 1)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        dp = self.drop_path
        gamma = stacked + dp(self.attn(self.norm(stacked)))  # attention across units, per token (G = L)
        gamma = gamma + dp(self.mlp(self.mlp_norm(gamma)))   # eq. 14
        weights = torch.sigmoid(self.select(gamma))         # [B, L, N_c, 1]
        return (weights * gamma).sum(dim=2)                 # eq. 15


class HAFE(nn.Module):
    """Hierarchical Aggregations and Feedback Enhancement layer (eqs. 14–16)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.video_units = UnitAggregation(dim, num_heads, mlp_ratio, qkv_bias, eps, drop_path)
        self.audio_units = UnitAggregation(dim, num_heads, mlp_ratio, qkv_bias, eps, drop_path)
        self.feedback_attn = CrossAttention(dim, num_heads, qkv_bias)     # shared by both modalities
        self.feedback_norm_av = LayerNorm(dim, eps)
        self.video_norm_q = LayerNorm(dim, eps)
        self.audio_norm_q = LayerNorm(dim, eps)
        self.video_mlp_norm = LayerNorm(dim, eps)
        self.video_mlp = Mlp(dim, int(dim * mlp_ratio))
        self.audio_mlp_norm = LayerNorm(dim, eps)
        self.audio_mlp = Mlp(dim, int(dim * mlp_ratio))

    def _feedback(self, f3_v: torch.Tensor, f3_a: torch.Tensor,
                  f_av: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 16's MHCA for both modalities in one call: the module is shared and its keys/values are
        F_av for both, and query rows attend independently, so the video and audio queries ride in one
        sequence (one q/kv/proj projection and one attention instead of two each; F_av's keys and
        values are computed once). Stochastic depth stays independent per modality."""
        queries = torch.cat([self.video_norm_q(f3_v), self.audio_norm_q(f3_a)], dim=1).unsqueeze(1)
        attended = self.feedback_attn(queries, self.feedback_norm_av(f_av).unsqueeze(1)).squeeze(1)
        fed_v, fed_a = attended.split([f3_v.shape[1], f3_a.shape[1]], dim=1)
        return f3_v + self.drop_path(fed_v), f3_a + self.drop_path(fed_a)

    def forward(self, stacked_v: torch.Tensor, stacked_a: torch.Tensor,
                f_av: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """stacked_m [B, Lm, N_c, C], f_av [B, Lav, C] -> (F_v^4 [B, Lv, C], F_a^4 [B, La, C])."""
        f4_v, f4_a = self._feedback(self.video_units(stacked_v), self.audio_units(stacked_a), f_av)
        return (f4_v + self.drop_path(self.video_mlp(self.video_mlp_norm(f4_v))),
                f4_a + self.drop_path(self.audio_mlp(self.audio_mlp_norm(f4_a))))


class IAVCL(nn.Module):
    """N_c DiER units with a shared ER layer, then HAFE (``dier``/``hafe`` False: Table 5's ablations)."""

    def __init__(self, dim: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-6, drop_path: float = 0.0, dier: bool = True,
                 hafe: bool = True) -> None:
        super().__init__()
        if not (dier or hafe):
            raise ValueError("IAV-CL without DiER units and without HAFE is HiCMAE's fusion: use fusion='hicmae'")
        unit = DiERUnit if dier else CrossModalUnit
        rates = stochastic_depth(drop_path, depth)
        self.units = nn.ModuleList(unit(dim, num_heads, mlp_ratio, qkv_bias, eps, rates[i]) for i in range(depth))
        if dier and hafe:
            self.refine = EvolutionaryRefinement(dim, eps)
        elif hafe:
            self.av_proj = Linear(2 * dim, dim)  # F_av^0 -> C for HAFE's feedback; no refinement without DiER
        if hafe:
            self.hafe = HAFE(dim, num_heads, mlp_ratio, qkv_bias, eps, drop_path / 2)
        else:
            self.video_norm = LayerNorm(dim, eps)
            self.audio_norm = LayerNorm(dim, eps)

    def forward(self, f_v: torch.Tensor, f_a: torch.Tensor,
                f_av: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """f_v [B, Lv, C], f_a [B, La, C], f_av [B, Lav, 2C] -> (F_v^4 [B, Lv, C], F_a^4 [B, La, C]).

        ``f_av`` may be None without HAFE (nothing reads it then)."""
        units_v, units_a = [], []
        refine = getattr(self, "refine", None)
        for i, unit in enumerate(self.units):
            f_v, f_a = unit(f_v, f_a)
            if refine is not None:
                f_av = refine(f_av, f_v, f_a, project=i == 0)
            units_v.append(f_v)
            units_a.append(f_a)
        if not hasattr(self, "hafe"):
            return self.video_norm(f_v), self.audio_norm(f_a)
        if refine is None:
            f_av = self.av_proj(f_av)
        return self.hafe(torch.stack(units_v, dim=2), torch.stack(units_a, dim=2), f_av)
