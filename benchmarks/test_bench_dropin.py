"""A VideoMAE-base-shaped pre-training step (forward + backward + loss), as VideoMAE writes it and with
the mae_kernels drop-in of docs/drop-in.md.

The "videomae" side follows MCG-NJU/VideoMAE (modeling_pretrain.py, engine_for_pretraining.py):
boolean-mask indexing of tokens and positional tables, ``torch.cat`` of visible and mask tokens,
attention as explicit ``softmax(q k^T) v``, targets unnormalised, rearranged and normalised per channel
before ``nn.MSELoss``. The "mae_kernels" side changes only what docs/drop-in.md changes: the token
selection and decoder input (``integrations.videomae``), attention (``grouped_attention`` with G = 1),
and the loss (``integrations.videomae.loss``). Everything else (patch embedding, MLPs, norms) is shared.

Shapes: ViT-B encoder (768 wide, 12 blocks, 12 heads), 384-wide 4-block decoder, 16 x 224 x 224 clips,
16 x 16 x 2 tubes (N = 1568), mask ratio 0.9, bf16 autocast, on CUDA. On CPU a small model runs the
same harness (both sides on the torch reference): CPU ratios only check the harness.
"""

import mae_kernels
import pytest
import torch
import torch.nn.functional as F
from mae_kernels.integrations import videomae
from torch import nn

from benchmarks.conftest import CUDA, DEVICE, run_timed

pytestmark = pytest.mark.kernels

ROLES = {"mae_kernels": "ours", "videomae": "baseline"}
if CUDA:
    SHAPE = dict(batch=8, frames=16, size=224, patch=16, dim=768, depth=12, heads=12, dec_dim=384, dec_depth=4,
                 dec_heads=6)
else:
    SHAPE = dict(batch=2, frames=4, size=64, patch=16, dim=128, depth=2, heads=2, dec_dim=64, dec_depth=1,
                 dec_heads=1)
TUBELET, MASK_RATIO = 2, 0.9


class Block(nn.Module):
    """Pre-norm ViT block; attention either VideoMAE's explicit softmax or grouped_attention (G = 1)."""

    def __init__(self, dim, heads, kernels):
        super().__init__()
        self.heads, self.kernels = heads, kernels
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x):
        B, N, C = x.shape
        H, D = self.heads, C // self.heads
        qkv = self.qkv(x)
        if self.kernels:
            q, k, v = qkv.view(B, 1, N, 3, H, D).unbind(3)
            return self.proj(mae_kernels.grouped_attention(q, k, v).view(B, N, C))
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        attn = ((q * D ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VideoMAEBase(nn.Module):
    def __init__(self, kernels, s=SHAPE):
        super().__init__()
        p, self.kernels = s["patch"], kernels
        self.patch = p
        self.N = (s["frames"] // TUBELET) * (s["size"] // p) ** 2
        self.num_masked = int(MASK_RATIO * self.N)
        self.embed = nn.Conv3d(3, s["dim"], (TUBELET, p, p), (TUBELET, p, p))
        self.register_buffer("pos", torch.randn(1, self.N, s["dim"]))
        self.register_buffer("pos_dec", torch.randn(1, self.N, s["dec_dim"]))
        self.encoder = nn.Sequential(*[Block(s["dim"], s["heads"], kernels) for _ in range(s["depth"])])
        self.to_decoder = nn.Linear(s["dim"], s["dec_dim"], bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s["dec_dim"]))
        self.decoder = nn.Sequential(*[Block(s["dec_dim"], s["dec_heads"], kernels) for _ in range(s["dec_depth"])])
        self.head = nn.Linear(s["dec_dim"], TUBELET * p * p * 3)

    def forward(self, videos, mask):
        x = self.embed(videos).flatten(2).transpose(1, 2)
        B, _, C = x.shape
        if self.kernels:
            visible, masked = videomae.mask_indices(mask, self.num_masked)
            x_vis = self.to_decoder(self.encoder(videomae.encoder_tokens(x, self.pos, visible)))
            x_full = videomae.decoder_tokens(x_vis, self.mask_token, self.pos_dec, visible, masked)
            pred = self.head(self.decoder(x_full)[:, -self.num_masked:])
            return videomae.loss(pred.float(), videos, masked, self.patch, TUBELET)
        x = x + self.pos.type_as(x)
        x_vis = self.to_decoder(self.encoder(x[~mask].reshape(B, -1, C)))
        pos = self.pos_dec.expand(B, -1, -1).type_as(x_vis)
        c = pos.shape[-1]
        x_full = torch.cat([x_vis + pos[~mask].reshape(B, -1, c), self.mask_token + pos[mask].reshape(B, -1, c)], 1)
        pred = self.head(self.decoder(x_full)[:, -self.num_masked:])
        return F.mse_loss(pred.float(), videomae_target(videos, mask, self.patch))


def videomae_target(videos, mask, p):
    """engine_for_pretraining.py's target: unnormalise, (p0 p1 p2) x c patches, per-channel unbiased std."""
    with torch.no_grad():
        shape = (1, 3, 1, 1, 1)
        unnorm = videos * torch.tensor(videomae.IMAGENET_DEFAULT_STD, device=videos.device).view(shape) \
            + torch.tensor(videomae.IMAGENET_DEFAULT_MEAN, device=videos.device).view(shape)
        B, C, T, H, W = unnorm.shape
        sq = unnorm.reshape(B, C, T // TUBELET, TUBELET, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        sq = sq.reshape(B, -1, TUBELET * p * p, C)
        sq = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        patches = sq.flatten(2)
        return patches[mask].reshape(B, -1, patches.shape[-1])


@pytest.mark.parametrize("impl", ["mae_kernels", "videomae"])
def test_videomae_base_pretraining_step(benchmark, impl):
    benchmark.group = "VideoMAE-base pre-training step (fwd+bwd)"
    benchmark.extra_info["role"] = ROLES[impl]
    torch.manual_seed(0)
    model = VideoMAEBase(kernels=impl == "mae_kernels").to(DEVICE)
    s = SHAPE
    videos = torch.randn(s["batch"], 3, s["frames"], s["size"], s["size"], device=DEVICE)
    scores = torch.rand(s["batch"], model.N, device=DEVICE)
    mask = scores.argsort(dim=1).argsort(dim=1) < model.num_masked  # a fixed count per row, as tube masking

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(videos, mask)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    run_timed(benchmark, step, rounds=10)

