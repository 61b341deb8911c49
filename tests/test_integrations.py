"""mae_kernels.integrations against independent re-implementations of the public codebases' formulas.

The "original" forward passes below are written here from the papers and the files read (never
copied): facebookresearch/mae ``models_mae.py`` (random_masking, forward_encoder, forward_decoder,
forward_loss), MCG-NJU/VideoMAE ``modeling_pretrain.py`` (PretrainVisionTransformer.forward) and
``engine_for_pretraining.py`` (target recipe), sunlicai/HiCMAE ``engine_for_pretraining_av.py`` (the
same recipe for audio). Each tiny model runs once the original way and once through the adapters,
with the same parameters: same loss to 1e-6 and same gradients, fp32, on the reference and on the
Triton backend (interpreter on CPU).
"""

import mae_kernels
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from mae_kernels.integrations import mae, videomae
from torch import nn

from tests.conftest import DEVICE, INTERPRETED

BACKENDS = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])
C_ENC, C_DEC, HEADS = 32, 16, 2


def block(dim):
    """A pre-norm transformer block: self-attention is equivariant to the order of its tokens."""
    return nn.TransformerEncoderLayer(dim, HEADS, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)


def assert_same_grads(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        if a.grad is None and b.grad is None:
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=2e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# --- MAE --------------------------------------------------------------------------------------------------


class TinyMAE(nn.Module):
    def __init__(self, patch=4, img=16):
        super().__init__()
        self.patch, L = patch, (img // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, C_ENC)
        self.cls_token = nn.Parameter(torch.randn(1, 1, C_ENC) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + L, C_ENC) * 0.02)
        self.enc = block(C_ENC)
        self.decoder_embed = nn.Linear(C_ENC, C_DEC)
        self.mask_token = nn.Parameter(torch.randn(1, 1, C_DEC) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, 1 + L, C_DEC) * 0.02)
        self.dec = block(C_DEC)
        self.pred = nn.Linear(C_DEC, 3 * patch * patch)

    def patchify(self, imgs):  # MAE: (n, c, h p, w q) -> (n, h w, p q c)
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=self.patch, q=self.patch)

    def original(self, imgs, noise, mask_ratio, norm_pix_loss):
        x = self.embed(self.patchify(imgs)) + self.pos_embed[:, 1:]
        B, L, C = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, C))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        x = self.decoder_embed(self.enc(x))
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - len_keep, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, C_DEC))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        pred = self.pred(self.dec(x))[:, 1:]
        target = self.patchify(imgs)
        if norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred

    def patched(self, imgs, noise, mask_ratio, norm_pix_loss):
        x, mask, ids_restore = mae.random_masking(self.embed(mae.patchify(imgs, self.patch)), mask_ratio,
                                                  self.pos_embed, self.cls_token, noise)
        x = self.decoder_embed(self.enc(x))
        x = mae.decoder_tokens(x, self.mask_token, self.decoder_pos_embed, ids_restore)
        pred = mae.unshuffle(self.pred(self.dec(x))[:, 1:], ids_restore)
        return mae.loss(pred, mae.patchify(imgs, self.patch), mask, norm_pix_loss), pred


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_adapter_matches_mae(backend, norm_pix_loss):
    torch.manual_seed(0)
    original = TinyMAE().to(DEVICE)
    patched = TinyMAE().to(DEVICE)
    patched.load_state_dict(original.state_dict())
    imgs = torch.rand(3, 3, 16, 16, device=DEVICE)
    noise = torch.rand(3, 16, device=DEVICE)
    want, want_pred = original.original(imgs, noise, 0.75, norm_pix_loss)
    with mae_kernels.backend(backend):
        got, got_pred = patched.patched(imgs, noise, 0.75, norm_pix_loss)
        got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_pred, want_pred, atol=1e-6, rtol=1e-5)
    assert_same_grads(original, patched)


def test_mae_norm_pix_uses_the_unbiased_variance():
    """The biased variance would differ by P/(P-1): the adapter must not."""
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 6, 12, generator=gen), torch.rand(2, 6, 12, generator=gen)
    mask = (torch.rand(2, 6, generator=gen).argsort(dim=1) < 4).float()
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    want = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.loss(pred, target, mask, norm_pix_loss=True), want)


def test_mae_shuffle_of_inverts_ids_restore():
    ids_shuffle = torch.rand(3, 10).argsort(dim=1)
    torch.testing.assert_close(mae.shuffle_of(ids_shuffle.argsort(dim=1)), ids_shuffle)


# --- VideoMAE / HiCMAE ------------------------------------------------------------------------------------


class TinyVideoMAE(nn.Module):
    def __init__(self, patch=4, tubelet=2, frames=4, img=8, channels=3):
        super().__init__()
        self.patch, self.tubelet, self.channels = patch, tubelet, channels
        N = (frames // tubelet) * (img // patch) ** 2
        self.embed = nn.Conv3d(channels, C_ENC, (tubelet, patch, patch), (tubelet, patch, patch))
        self.register_buffer("pos_enc", torch.randn(1, N, C_ENC))  # fixed tables, as VideoMAE's sinusoid
        self.register_buffer("pos_dec", torch.randn(1, N, C_DEC))
        self.enc = block(C_ENC)
        self.encoder_to_decoder = nn.Linear(C_ENC, C_DEC, bias=False)
        self.mask_token = nn.Parameter(torch.randn(1, 1, C_DEC) * 0.02)
        self.dec = block(C_DEC)
        self.head = nn.Linear(C_DEC, tubelet * patch * patch * channels)

    def original(self, videos, mask, normalize_target, mean, std):
        x = self.embed(videos).flatten(2).transpose(1, 2)
        B, _, C = x.shape
        x = x + self.pos_enc.type_as(x).clone().detach()
        x_vis = self.encoder_to_decoder(self.enc(x[~mask].reshape(B, -1, C)))
        pos = self.pos_dec.expand(B, -1, -1)
        pos_vis, pos_mask = pos[~mask].reshape(B, -1, C_DEC), pos[mask].reshape(B, -1, C_DEC)
        x_full = torch.cat([x_vis + pos_vis, self.mask_token + pos_mask], dim=1)
        outputs = self.head(self.dec(x_full)[:, -pos_mask.shape[1]:])
        with torch.no_grad():  # engine_for_pretraining.py's target
            unnorm = videos * torch.as_tensor(std, device=videos.device)[None, :, None, None, None] \
                + torch.as_tensor(mean, device=videos.device)[None, :, None, None, None]
            p, t = self.patch, self.tubelet
            if normalize_target:
                sq = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=t, p1=p, p2=p)
                sq = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt()
                                                             + 1e-6)
                patches = rearrange(sq, "b n p c -> b n (p c)")
            else:
                patches = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=t, p1=p, p2=p)
            labels = patches[mask].reshape(B, -1, patches.shape[-1])
        return F.mse_loss(outputs, labels)

    def patched(self, videos, mask, num_masked, normalize_target, mean, std):
        x = self.embed(videos).flatten(2).transpose(1, 2)
        visible, masked = videomae.mask_indices(mask, num_masked)
        assert all(torch.equal(a, b) for a, b in zip(videomae.mask_indices(mask), (visible, masked)))
        x_vis = self.encoder_to_decoder(self.enc(videomae.encoder_tokens(x, self.pos_enc, visible)))
        x_full = videomae.decoder_tokens(x_vis, self.mask_token, self.pos_dec, visible, masked)
        outputs = self.head(self.dec(x_full)[:, -num_masked:])
        return videomae.loss(outputs, videos, masked, self.patch, self.tubelet, normalize_target, mean, std)


def tube_mask(B, N, num_masked, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, generator=gen).argsort(dim=1) < num_masked).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize_target", [True, False])
def test_videomae_adapter_matches_videomae(backend, normalize_target):
    torch.manual_seed(0)
    original, patched = TinyVideoMAE().to(DEVICE), TinyVideoMAE().to(DEVICE)
    patched.load_state_dict(original.state_dict())
    mean, std = videomae.IMAGENET_DEFAULT_MEAN, videomae.IMAGENET_DEFAULT_STD
    videos = torch.randn(2, 3, 4, 8, 8, device=DEVICE)
    mask = tube_mask(2, 8, 6, seed=1)
    want = original.original(videos, mask, normalize_target, mean, std)
    with mae_kernels.backend(backend):
        got = patched.patched(videos, mask, 6, normalize_target, mean, std)
        got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert_same_grads(original, patched)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_positions_is_hicmaes_visible_position_add(backend):
    """HiCMAE adds pos[~mask] to intermediate encoder features that are already the visible tokens."""
    mask = tube_mask(2, 10, 7, seed=5)
    feats = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 10, 16, device=DEVICE)
    visible, _ = videomae.mask_indices(mask, 7)
    with mae_kernels.backend(backend):
        got = videomae.add_positions(feats, pos, visible)
    want = feats + pos.expand(2, -1, -1)[~mask].reshape(2, -1, 16)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), feats)[0],
                               torch.autograd.grad(want.square().sum(), feats)[0])


def test_hicmae_audio_target_recipe():
    """HiCMAE's audio branch: one channel, (p1 p2 c) patches, no unnormalisation, same statistics."""
    gen = torch.Generator().manual_seed(2)
    audio = torch.randn(2, 1, 16, 8, generator=gen).to(DEVICE)
    mask = tube_mask(2, 8, 5, seed=3)
    pred = torch.randn(2, 5, 16, generator=gen).to(DEVICE).requires_grad_()
    sq = rearrange(audio, "b c (h p1) (w p2) -> b (h w) (p1 p2) c", p1=4, p2=4)
    sq = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    labels = rearrange(sq, "b n p c -> b n (p c)")[mask].reshape(2, 5, 16)
    want = F.mse_loss(pred, labels)
    _, masked = videomae.mask_indices(mask, 5)
    for backend in BACKENDS:
        with mae_kernels.backend(backend):
            got = videomae.loss(pred, audio, masked, patch_size=4, mean=None, std=None)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred,
                                                                                            retain_graph=True)[0])


def test_videomae_patchify_refuses_sizes_the_patch_does_not_divide():
    """Both layouts name the mismatched argument instead of failing inside reshape with a shape error."""
    with pytest.raises(ValueError, match=r"clip \[H=10, W=8\] must divide by patch_size=4"):
        videomae.patchify(torch.randn(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match=r"clip \[T=4, H=8, W=6\] must divide by tubelet_size=2 and patch_size=4"):
        videomae.patchify(torch.randn(1, 3, 4, 8, 6), 4)
    audio = torch.arange(2 * 16 * 8, dtype=torch.float32).reshape(2, 1, 16, 8)
    want = rearrange(audio, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)
    assert torch.equal(videomae.patchify(audio, 4), want)  # divisible sizes are unaffected
