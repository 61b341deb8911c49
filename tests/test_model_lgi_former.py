"""LGI-Former layer and encoders against an independent per-region reference; token order contract."""

import math

import pytest
import torch

from avfmae.config import get_config
from avfmae.embed import sinusoid_table
from avfmae.hicmae import ViTEncoder
from avfmae.layers import Attention, CrossAttention
from avfmae.lgi_former import LGIEncoder, LGILayer, attention_shapes
from avfmae.masking import region_index, sample_pretrain_masks


def randomise(module, seed=0):
    """Random values for every parameter (norm weights too), so swapped modules cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0.0))
    return module


def ref_mha(attn, q_in, kv_in):
    """Textbook multi-head attention with the module's weights: q_in [Lq, C], kv_in [Lk, C]."""
    C = q_in.shape[-1]
    H = attn.num_heads
    if isinstance(attn, Attention):
        wq, wk, wv = attn.qkv_weight.split(C)
    else:
        wq, (wk, wv) = attn.q_weight, attn.kv_weight.split(C)
    q = q_in @ wq.T + attn.q_bias
    k = kv_in @ wk.T
    v = kv_in @ wv.T + attn.v_bias
    heads = lambda t: t.view(t.shape[0], H, C // H).transpose(0, 1)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(1, 2) / math.sqrt(C // H), dim=-1)
    out = (w @ heads(v)).transpose(0, 1).reshape(q.shape[0], C)
    return attn.proj(out)


def ref_lgi_layer(layer, x, s):
    """Eqs. 4-7 + shared MLP written per sample and per region with plain loops."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        hs = []
        for i in range(x.shape[1]):                                        # I
            h = torch.cat([s[b, i:i + 1], x[b, i]])
            n = layer.local_norm(h)
            hs.append(h + ref_mha(layer.local_attn, n, n))
        sb = torch.stack([h[0] for h in hs])
        xb = torch.cat([h[1:] for h in hs])
        n = layer.region_norm(sb)
        sb = sb + ref_mha(layer.region_attn, n, n)                         # II
        xb = xb + ref_mha(layer.l2r_attn, layer.l2r_norm_q(xb), layer.l2r_norm_kv(sb))   # III
        sb = sb + ref_mha(layer.r2l_attn, layer.r2l_norm_q(sb), layer.r2l_norm_kv(xb))   # IV
        xb = xb + layer.mlp(layer.mlp_norm(xb))
        sb = sb + layer.mlp(layer.mlp_norm(sb))
        xs.append(xb.view(x.shape[1], x.shape[2], -1))
        ss.append(sb)
    return torch.stack(xs), torch.stack(ss)


@pytest.mark.parametrize("B,K,Z,C,H", [(2, 8, 10, 64, 2), (1, 8, 3, 64, 4), (2, 4, 17, 32, 2)])
def test_lgi_layer_matches_per_region_reference(B, K, Z, C, H):
    layer = randomise(LGILayer(C, H)).eval()
    x, s = torch.randn(B, K, Z, C), torch.randn(B, K, C)
    out_x, out_s = layer(x, s)
    ref_x, ref_s = ref_lgi_layer(layer, x, s)
    torch.testing.assert_close(out_x, ref_x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_s, ref_s, atol=1e-4, rtol=1e-4)


def test_lgi_layer_without_region_update_matches_local_tokens():
    layer = randomise(LGILayer(64, 2), seed=1).eval()
    x, s = torch.randn(2, 8, 5, 64), torch.randn(2, 8, 64)
    full_x, _ = layer(x, s)
    local_x, _ = layer(x, s, update_regions=False)
    torch.testing.assert_close(local_x, full_x)


def test_cross_attention_matches_reference():
    attn = randomise(CrossAttention(64, 4), seed=2)
    q, kv = torch.randn(3, 1, 7, 64), torch.randn(3, 1, 5, 64)
    out = attn(q, kv)
    for b in range(3):
        torch.testing.assert_close(out[b, 0], ref_mha(attn, q[b, 0], kv[b, 0]), atol=1e-5, rtol=1e-5)


# --- encoders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 160, 160, generator=g), torch.randn(B, 1, 256, 128, generator=g)


def test_encoder_emits_region_major_tokens_listed_by_order(cfg):
    """With no layers the encoder is embed + pos + norm: token j must be patch order[j]."""
    enc = LGIEncoder(cfg, "video").eval()
    enc.layers = torch.nn.ModuleList()
    video, _ = inputs()
    masks = sample_pretrain_masks(cfg, 2, torch.Generator().manual_seed(1))
    out = enc(video, masks.video_visible)
    embedded = enc.embed(video) + sinusoid_table(800, cfg.embed_dim)
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(out.tokens, enc.norm(embedded[rows, out.order]))
    rid = region_index(cfg.video_grid, cfg.video_region)
    assert bool((rid[out.order].view(2, 8, 10) == torch.arange(8)[None, :, None]).all())
    assert torch.equal(out.order.sort(1).values, masks.video_visible)


def test_encoder_sees_only_visible_patches(cfg):
    torch.manual_seed(0)
    enc = LGIEncoder(cfg, "audio").eval()
    _, audio = inputs()
    masks = sample_pretrain_masks(cfg, 2, torch.Generator().manual_seed(2))
    base = enc(audio, masks.audio_visible).tokens
    patch = lambda a, p: a[:, :, (p // 8) * 16:(p // 8 + 1) * 16, (p % 8) * 16:(p % 8 + 1) * 16]  # noqa: E731
    hidden_pos = next(p for p in range(128) if p not in masks.audio_visible[0] and p not in masks.audio_visible[1])
    changed = audio.clone()
    patch(changed, hidden_pos).add_(5.0)
    torch.testing.assert_close(enc(changed, masks.audio_visible).tokens, base)
    changed = audio.clone()
    patch(changed, int(masks.audio_visible[0, 0])).add_(5.0)
    assert not torch.allclose(enc(changed, masks.audio_visible).tokens[0], base[0])


def test_encoder_output_independent_of_visible_index_order(cfg):
    enc = LGIEncoder(cfg, "video").eval()
    video, _ = inputs()
    vis = sample_pretrain_masks(cfg, 2, torch.Generator().manual_seed(3)).video_visible
    shuffled = vis[:, torch.randperm(vis.shape[1])]
    a, b = enc(video, vis), enc(video, shuffled)
    assert torch.equal(a.order, b.order)
    torch.testing.assert_close(a.tokens, b.tokens)


def test_encoder_outputs_for_finetuning_and_hcmcl(cfg):
    enc = LGIEncoder(cfg, "audio").eval()
    _, audio = inputs()
    out = enc(audio, hidden_layers=(0, 2), return_regions=True)
    assert out.tokens.shape == (2, 128, cfg.embed_dim) and out.order.shape == (2, 128)
    assert out.regions.shape == (2, 8, cfg.depth, cfg.embed_dim)
    assert [h.shape for h in out.hidden] == [(2, 128, cfg.embed_dim)] * 2
    torch.testing.assert_close(out.hidden[1], out.tokens)       # layer 2 is the last one
    # normalised by the encoder's LayerNorm (unit variance per token at init: weight 1, bias 0)
    torch.testing.assert_close(out.regions.var(-1, unbiased=False), torch.ones(2, 8, cfg.depth), atol=1e-3, rtol=0)


def test_vit_encoder_emits_tokens_in_visible_order(cfg):
    enc = ViTEncoder(cfg, "video").eval()
    enc.layers = torch.nn.ModuleList()
    video, _ = inputs()
    vis = sample_pretrain_masks(cfg, 2, torch.Generator().manual_seed(4)).video_visible
    out = enc(video, vis)
    embedded = enc.embed(video) + sinusoid_table(800, cfg.embed_dim)
    torch.testing.assert_close(out.tokens, enc.norm(embedded[torch.arange(2)[:, None], vis]))
    assert torch.equal(out.order, vis)


@pytest.mark.parametrize("encoder_cls", [LGIEncoder, ViTEncoder])
def test_activation_checkpointing_gives_identical_gradients(encoder_cls):
    cfg = get_config("tiny", drop_path=0.2, checkpoint_activations=False)
    torch.manual_seed(0)
    enc = encoder_cls(cfg, "audio").train()
    _, audio = inputs()
    vis = sample_pretrain_masks(cfg, 2, torch.Generator().manual_seed(5)).audio_visible

    def grads(checkpointing):
        enc.zero_grad()
        enc.checkpoint_activations = checkpointing
        torch.manual_seed(123)                                   # same drop-path draws
        out = enc(audio, vis, hidden_layers=(1,))
        (out.tokens.square().mean() + out.hidden[0].mean()).backward()
        return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_drop_path_is_per_sample_and_off_in_eval():
    from avfmae.layers import drop_path

    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert bool((per_sample == per_sample[:, :1]).all()), "a whole sample is kept or dropped"
    torch.testing.assert_close(per_sample[:, 0].unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    layer = LGILayer(32, 2, drop_path=0.5).eval()
    xs, ss = torch.randn(2, 2, 3, 32), torch.randn(2, 2, 32)
    torch.testing.assert_close(layer(xs, ss)[0], layer(xs, ss)[0])


def test_attention_shapes_are_the_calls_the_encoders_make(cfg, monkeypatch):
    """attention_shapes (what the kernel tests and resource checks cover) lists exactly the (G, Lq, Lk)
    of the encoders' grouped_attention calls, pre-training (visible tokens) and fine-tuning (all)."""
    import avfmae.layers

    seen = set()

    def recording(q, k, v, *args, **kwargs):
        seen.add((q.shape[1], q.shape[2], k.shape[2]))
        return grouped_attention(q, k, v, *args, **kwargs)

    grouped_attention = avfmae.layers.grouped_attention
    monkeypatch.setattr(avfmae.layers, "grouped_attention", recording)
    video, audio = inputs(B=1)
    masks = sample_pretrain_masks(cfg, 1, torch.Generator().manual_seed(0))
    for modality, x, visible in (("video", video, masks.video_visible), ("audio", audio, masks.audio_visible)):
        encoder = LGIEncoder(cfg, modality)
        for keep in (visible, None):
            encoder(x, keep, return_regions=True)  # every layer updates its region tokens
    assert seen == set(attention_shapes(cfg).values())
