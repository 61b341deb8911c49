"""Embeddings, positional tables and patch layouts."""

import math

import pytest
import torch
from mae_kernels.masked_mse_loss import denormalise_patches, normalise_patches

from avfmae.embed import (
    CubeEmbed,
    PatchEmbed,
    fill_predictions,
    frame_difference,
    patchify_audio,
    patchify_video,
    sinusoid_table,
    unpatchify_audio,
    unpatchify_video,
)


def test_video_patches_are_channel_major_raster_ordered():
    video = torch.randn(2, 3, 16, 160, 160)
    p = patchify_video(video)
    assert p.shape == (2, 800, 1536)
    # token (t=3, h=4, w=7), value (c=2, pt=1, y=5, x=9)
    n = (3 * 10 + 4) * 10 + 7
    v = ((2 * 2 + 1) * 16 + 5) * 16 + 9
    assert p[1, n, v] == video[1, 2, 3 * 2 + 1, 4 * 16 + 5, 7 * 16 + 9]
    torch.testing.assert_close(unpatchify_video(p, (8, 10, 10)), video, rtol=0, atol=0)


def test_audio_patches_roundtrip():
    audio = torch.randn(2, 1, 256, 128)
    p = patchify_audio(audio)
    assert p.shape == (2, 128, 256)
    assert p[0, 5 * 8 + 3, 7 * 16 + 2] == audio[0, 0, 5 * 16 + 7, 3 * 16 + 2]
    assert torch.equal(unpatchify_audio(p, (16, 8)), audio)


def test_embedding_token_order_matches_patch_order():
    video = torch.randn(1, 3, 4, 32, 48)
    embed = CubeEmbed(4, tubelet=2, patch=16)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.weight[0] = 1.0                   # channel 0 sums the whole tubelet
        embed.proj.bias.zero_()
    tokens = embed(video)
    torch.testing.assert_close(tokens[0, :, 0], patchify_video(video)[0].sum(-1), rtol=1e-5, atol=1e-4)
    audio = torch.randn(1, 1, 64, 32)
    aembed = PatchEmbed(4, patch=16)
    with torch.no_grad():
        aembed.proj.weight.zero_()
        aembed.proj.weight[1] = 1.0
        aembed.proj.bias.zero_()
    torch.testing.assert_close(aembed(audio)[0, :, 1], patchify_audio(audio)[0].sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_embedding_only_the_kept_rows_equals_embedding_all_then_gathering(modality):
    # the encoders embed only the tokens they keep: a conv with kernel = stride is a per-patch Linear
    torch.manual_seed(0)
    if modality == "video":
        embed, inputs, n = CubeEmbed(8, tubelet=2, patch=16), torch.randn(2, 3, 4, 32, 48), 12
    else:
        embed, inputs, n = PatchEmbed(8, patch=16), torch.randn(2, 1, 64, 32), 8
    rows = torch.stack([torch.randperm(n)[:5], torch.randperm(n)[:5]])   # any order, as the encoders ask
    weight = torch.randn(2, 5, 8)
    got = embed(inputs, rows)
    (got * weight).sum().backward()
    got_grads = [p.grad.clone() for p in embed.parameters()]
    embed.zero_grad()
    want = torch.take_along_dim(embed(inputs), rows.unsqueeze(-1), dim=1)
    (want * weight).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, p in zip(got_grads, embed.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


def test_sinusoid_table_values():
    t = sinusoid_table(50, 8)
    assert t.shape == (50, 8) and t.dtype == torch.float32
    for p, i in ((0, 0), (7, 1), (49, 3)):
        angle = p / 10000 ** (2 * i / 8)
        assert math.isclose(float(t[p, 2 * i]), math.sin(angle), abs_tol=1e-6)
        assert math.isclose(float(t[p, 2 * i + 1]), math.cos(angle), abs_tol=1e-6)


def test_frame_difference_keeps_frame0_and_subtracts_it():
    patches = torch.randn(2, 5, 3 * 2 * 4)                   # (c pt s) with s = 4 pixels
    d = frame_difference(patches, tubelet=2).view(2, 5, 3, 2, 4)
    x = patches.view(2, 5, 3, 2, 4)
    assert torch.equal(d[:, :, :, 0], x[:, :, :, 0])
    torch.testing.assert_close(d[:, :, :, 1], x[:, :, :, 1] - x[:, :, :, 0])


def test_normalise_patches_per_channel():
    # the norm-pix formula's owner (mae_kernels) on avfmae's (c ...) video layout: 3 contiguous groups
    patches = torch.randn(2, 3, 12) * 5 + 3
    n = normalise_patches(patches, 3).view(2, 3, 3, 4)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.var(-1, unbiased=False), torch.ones(2, 3, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(denormalise_patches(n.view(2, 3, 12), patches, 3), patches, atol=1e-4, rtol=1e-5)


def test_fill_predictions_undoes_normalisation():
    patches = torch.randn(2, 10, 12) * 4 + 1
    idx = torch.tensor([[1, 4, 7], [0, 2, 9]])
    rows = torch.stack([patches[b, idx[b]] for b in range(2)])
    grouped = rows.view(2, 3, 3, 4)  # independent of the library: per-channel (x - mean) / sqrt(var + eps)
    perfect = ((grouped - grouped.mean(-1, keepdim=True))
               / torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + 1e-6)).view(2, 3, 12)
    filled = fill_predictions(patches, perfect, idx, norm_groups=3)
    torch.testing.assert_close(filled, patches, atol=1e-4, rtol=1e-4)
    zeros = fill_predictions(patches, torch.zeros_like(rows), idx, norm_groups=1, norm_pix=False)
    assert bool((zeros[0, 1] == 0).all()) and torch.equal(zeros[0, 3], patches[0, 3])
