"""Pre-training models end to end: losses, gradients, decoder token order, backends, base size on CPU."""


import mae_kernels
import pytest
import torch

import avfmae
from avfmae.embed import fill_predictions, patchify_audio, patchify_video, unpatchify_video
from avfmae.masking import PretrainMasks, sample_pretrain_masks
from tests.conftest import INTERPRETED
from tests.helpers.references import norm_pix


def batch(B=2, seed=0, cfg=None):
    cfg = cfg or avfmae.get_config("tiny")
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, cfg.num_frames, cfg.image_size, cfg.image_size, generator=g)
    audio = torch.randn(B, 1, cfg.audio_frames, cfg.audio_bins, generator=g)
    return video, audio, sample_pretrain_masks(cfg, B, g)


def video_tubes(video, tubelet, patch):
    """[B, 3, T, H, W] -> [B, N, 3, tubelet, patch * patch] in raster (t, h, w) order, by plain reshapes (not
    avfmae.embed's einops layout), so the expected targets below do not reuse the code under test."""
    B, C, T, H, W = video.shape
    x = video.reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b t h w | c pt ph pw
    return x.reshape(B, -1, C, tubelet, patch * patch)


def stage_iv_of_last_layer(model):
    """Pre-training never reads the region tokens after the last layer: its stage IV has no use."""
    return {n for n, _ in model.named_parameters()
            if n.startswith(("video_encoder.layers.%d.r2l" % (model.cfg.depth - 1),
                             "audio_encoder.layers.%d.r2l" % (model.cfg.depth - 1)))}


def assert_gradients(model, exempt=frozenset()):
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    assert missing == set(exempt), f"unexpected gradient coverage: {sorted(missing ^ set(exempt))[:8]}"
    dead = [n for n, p in model.named_parameters() if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"all-zero gradients: {dead[:8]}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return avfmae.build_model("tiny", "pretrain")


def test_tiny_pretrain_forward_backward(tiny):
    video, audio, masks = batch()
    tiny.zero_grad()
    out = tiny(video, audio, masks)
    assert set(out) == {"loss", "loss_video", "loss_audio", "loss_hcmcl"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 and torch.isfinite(v) for v in out.values())
    total = out["loss_video"] + out["loss_audio"] + 0.0025 * out["loss_hcmcl"]
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    exempt = stage_iv_of_last_layer(tiny)
    assert len(exempt) == 20
    assert_gradients(tiny, exempt)


def test_loss_counts_only_decoder_targets_the_encoder_masked(tiny):
    video, audio, masks = batch(seed=1)
    with torch.no_grad():
        out = tiny(video, audio, masks, return_predictions=True)
    assert out["pred_video"].shape == (2, 400, 1536) and out["pred_audio"].shape == (2, 64, 256)
    for pred, patches, dec, vis, groups, key in (
            (out["pred_video"], video_tubes(video, 2, 16).flatten(2), masks.video_decode, masks.video_visible, 3,
             "loss_video"),
            (out["pred_audio"], patchify_audio(audio), masks.audio_decode, masks.audio_visible, 1, "loss_audio")):
        target = norm_pix(torch.stack([patches[b, dec[b]] for b in range(2)]), groups)
        err = (pred - target).pow(2).mean(-1)                              # [B, Md]
        valid = torch.stack([~torch.isin(dec[b], vis[b]) for b in range(2)])
        assert 0 < int(valid.sum()) < valid.numel()
        torch.testing.assert_close(out[key], err[valid].mean())


def test_decoder_positions_follow_the_encoders_emitted_order(tiny):
    """Pins DESIGN's order contract: pos[enc_idx] must be added in the encoder's region-major order
    (the reference code adds raster-order positions to region-major tokens)."""
    video, audio, masks = batch(seed=2)
    seen = {}
    tiny.fusion.register_forward_hook(lambda m, i, o: seen.__setitem__("fused", o[0]))
    h = tiny.video_decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        tiny(video, audio, masks)
        dec = tiny.video_decoder
        order = tiny.video_encoder.emitted_order(masks.video_visible, 2)
        pos = dec.pos
        expected_visible = dec.encoder_to_decoder(seen["fused"]) + pos[order]
        expected_masked = dec.mask_token.weight + pos[masks.video_decode]
    h.remove()
    torch.testing.assert_close(seen["x"][:, :80], expected_visible)
    torch.testing.assert_close(seen["x"][:, 80:], expected_masked)
    assert not torch.equal(order, masks.video_visible), "region-major order differs from raster order"
    wrong = dec.encoder_to_decoder(seen["fused"]) + pos[masks.video_visible]   # the reference-code bug
    assert not torch.allclose(seen["x"][:, :80], wrong)


def test_masks_drawn_when_not_given_and_inputs_checked(tiny):
    video, audio, _ = batch(B=1)
    with torch.no_grad():
        out = tiny(video, audio, return_predictions=True)
    assert isinstance(out["masks"], PretrainMasks) and out["masks"].video_visible.shape == (1, 80)
    with pytest.raises(ValueError, match=r"video must have shape \[B, 3, 16, 160, 160\]"):
        tiny(video[:, :, :8], audio)
    with pytest.raises(ValueError, match="audio must have shape"):
        tiny(video, audio[..., :64])
    with pytest.raises(ValueError, match="share the batch size"):
        tiny(video, torch.cat([audio, audio]))
    with pytest.raises(TypeError, match="masks must be a PretrainMasks"):
        tiny(video, audio, masks={"video_visible": None})


def test_reconstructions_can_be_unpatchified(tiny):
    video, audio, masks = batch(B=1, seed=3)
    with torch.no_grad():
        out = tiny(video, audio, masks, return_predictions=True)
    patches = patchify_video(video)
    filled = fill_predictions(patches, out["pred_video"], masks.video_decode, norm_groups=3)
    recon = unpatchify_video(filled, (8, 10, 10))
    assert recon.shape == video.shape
    untouched = torch.ones(800, dtype=torch.bool)
    untouched[masks.video_decode[0]] = False
    assert torch.equal(filled[0, untouched], patches[0, untouched])


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain")
    video, audio, masks = batch(B=2, seed=4)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=2e-3)
    losses = []
    for _ in range(15):
        out = model(video, audio, masks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.9 * losses[0] and min(losses[-3:]) < min(losses[:3]), losses


def test_checkpointed_model_matches():
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain")
    video, audio, masks = batch(seed=5)

    def run(enabled):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        loss = model(video, audio, masks)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = run(False), run(True)
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_hicmae_baseline_decodes_every_masked_token():
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "hicmae_pretrain")
    video, audio, masks = batch(seed=6)
    out = model(video, audio, masks, return_predictions=True)
    assert out["pred_video"].shape == (2, 720, 1536) and out["pred_audio"].shape == (2, 104, 256)
    full = torch.cat([masks.video_visible, out["masks"].video_decode], 1).sort(1).values
    assert torch.equal(full, torch.arange(800).expand(2, -1))
    out["loss"].backward()
    assert_gradients(model)


@pytest.mark.parametrize("lgi", ["improved", "vanilla"])
def test_table4_variant_trains(lgi):
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain", fusion="hicmae", lgi=lgi)
    video, audio, masks = batch(seed=7)
    model(video, audio, masks)["loss"].backward()
    assert_gradients(model, stage_iv_of_last_layer(model))
    assert bool(stage_iv_of_last_layer(model)) == (lgi == "improved")


@pytest.mark.parametrize("fusion", ["iavcl_no_dier", "iavcl_no_hafe"])
def test_table5_fusion_variants_pretrain(fusion):
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain", fusion=fusion)
    video, audio, masks = batch(seed=7)
    model(video, audio, masks)["loss"].backward()
    assert_gradients(model, stage_iv_of_last_layer(model))


def test_frame_difference_target_option():
    """frame_diff_target: the video loss is the MSE against per-channel norm-pix patches in which every
    tubelet frame j >= 1 is replaced by frame j - frame 0 (computed here from the raw clip)."""
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain", frame_diff_target=True)
    cfg = model.cfg
    video, audio, masks = batch(seed=8)
    out = model(video, audio, masks, return_predictions=True)
    tubes = video_tubes(video, cfg.tubelet, cfg.patch_size)            # [B, N, 3, pt, p*p]
    width = 3 * cfg.tubelet * cfg.patch_size ** 2
    assert out["pred_video"].shape[-1] == width
    normed = norm_pix(tubes.reshape(*tubes.shape[:2], width), 3).reshape(tubes.shape)
    diff = torch.cat([normed[:, :, :, :1], normed[:, :, :, 1:] - normed[:, :, :, :1]], dim=3)
    target = diff.reshape(*tubes.shape[:2], width)
    dec, vis = masks.video_decode, masks.video_visible
    rows = torch.stack([target[b, dec[b]] for b in range(2)])
    valid = torch.stack([~torch.isin(dec[b], vis[b]) for b in range(2)])
    err = (out["pred_video"] - rows).pow(2).mean(-1)
    torch.testing.assert_close(out["loss_video"], err[valid].mean())
    plain = norm_pix(tubes.reshape(*tubes.shape[:2], width), 3)
    plain_err = (out["pred_video"] - torch.stack([plain[b, dec[b]] for b in range(2)])).pow(2).mean(-1)
    assert not torch.isclose(out["loss_video"], plain_err[valid].mean()), "the option changes the video target"


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                    reason="Triton runs compiled on CUDA or interpreted on CPU (TRITON_INTERPRET=1); neither here")
def test_triton_and_reference_backends_agree_on_tiny_model(device):
    # on the device the suite targets: compiled kernels on CUDA, the interpreter on CPU
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "pretrain").to(device)
    video, audio, masks = batch(B=1, seed=9)
    video, audio, masks = video.to(device), audio.to(device), masks.to(device)

    def run(name):
        model.zero_grad()
        with mae_kernels.backend(name):
            out = model(video, audio, masks)
            out["loss"].backward()
        return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}

    (ref_out, ref_grads), (tri_out, tri_grads) = run("torch"), run("triton")
    for k in ref_out:
        torch.testing.assert_close(tri_out[k], ref_out[k], atol=1e-5, rtol=1e-5, msg=k)
    assert ref_grads.keys() == tri_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(tri_grads[n], ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.slow
def test_base_pretrain_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = avfmae.build_model("base", "pretrain")
    cfg = model.cfg
    video, audio, masks = batch(B=2, seed=10, cfg=cfg)
    out = model(video, audio, masks)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert_gradients(model, stage_iv_of_last_layer(model))
