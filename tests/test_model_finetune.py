"""Fine-tuning classifier: outputs, losses, loading pre-trained encoders, optimizer parameter groups."""

import pytest
import torch

import avfmae
from tests.test_model_pretrain import assert_gradients


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 160, 160, generator=g), torch.randn(B, 1, 256, 128, generator=g)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    # drop_path 0: with stochastic depth a whole layer may be dropped for the batch, zeroing its grads
    return avfmae.build_model("tiny", "finetune", num_outputs=7, label_smoothing=0.1, drop_path=0.0)


def test_audio_visual_classifier_trains_every_parameter(classifier):
    video, audio = inputs()
    classifier.train().zero_grad()
    logits = classifier(video, audio)
    assert logits.shape == (2, 7) and bool(torch.isfinite(logits).all())
    loss = classifier.compute_loss(logits, torch.tensor([1, 6]))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 6]), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert_gradients(classifier)        # region tokens of every layer are used, so stage IV trains too


def test_soft_targets_and_batch_size_one(classifier):
    video, audio = inputs(B=1)
    classifier.train()
    logits = classifier(video, audio)
    assert logits.shape == (1, 7)
    # soft targets (mixup) carry their own smoothing: used as given, not smoothed by the model's 0.1
    # (random logits: the fresh head's are nearly uniform, where extra smoothing changes nothing)
    logits = logits + torch.randn(1, 7, generator=torch.Generator().manual_seed(0))
    soft = torch.tensor([[0.6, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0]])
    expected = -(soft * logits.detach().log_softmax(-1)).sum()
    loss = classifier.compute_loss(logits, soft)
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="target: soft targets need the logits' shape"):
        classifier.compute_loss(logits, torch.full((1, 6), 1 / 6))


def test_classifier_depends_on_both_modalities(classifier):
    video, audio = inputs(seed=1)
    classifier.eval()
    with torch.no_grad():
        base = classifier(video, audio)
        assert not torch.allclose(classifier(video, audio + 1), base)
        assert not torch.allclose(classifier(video + 1, audio), base)
    with pytest.raises(ValueError, match="audio is required"):
        classifier(video)
    with pytest.raises(ValueError, match="share the batch size, got 2 and 1"):  # before IAV-CL's cat
        classifier(video, audio[:1])


def test_video_only_and_regression_heads():
    torch.manual_seed(0)
    video, audio = inputs()
    mer = avfmae.build_model("tiny", "finetune", num_outputs=3, video_only=True, drop_path=0.0)
    assert not hasattr(mer, "audio_encoder") and not hasattr(mer, "fusion")
    logits = mer(video)
    assert logits.shape == (2, 3)
    mer.compute_loss(logits, torch.tensor([0, 2])).backward()
    assert_gradients(mer)
    with pytest.raises(ValueError, match="video-only"):
        mer(video, audio)
    reg = avfmae.build_model("tiny", "finetune", num_outputs=3, regression=True)
    out = reg(video, audio)
    target = torch.randn(2, 3)
    torch.testing.assert_close(reg.compute_loss(out, target), torch.nn.functional.mse_loss(out, target))


def test_checkpoints_with_the_gates_as_two_linears_still_load():
    # written before DiER's gates became one GatePair: gate_self.* and gate_cross.* per unit and modality
    torch.manual_seed(0)
    pre = avfmae.build_model("tiny", "pretrain")
    old = {}
    for k, v in pre.state_dict().items():
        prefix, sep, param = k.rpartition("gates.")
        if sep:
            old[f"{prefix}gate_self.{param}"], old[f"{prefix}gate_cross.{param}"] = v.chunk(2)
        else:
            old[k] = v
    assert sum(".gate_self." in k for k in old) == 2 * 2 * 2      # weight + bias, 2 units, 2 modalities
    ft = avfmae.build_model("tiny", "finetune", num_outputs=4)
    missing, unexpected = ft.load_pretrained_encoders({"model": old})
    assert unexpected == [] and not any("gate" in k for k in missing)
    own = ft.state_dict()
    for k, v in pre.state_dict().items():
        if k.startswith("fusion."):
            assert torch.equal(own[k], v), k


def test_load_pretrained_encoders_from_pretraining_checkpoint():
    torch.manual_seed(0)
    pre = avfmae.build_model("tiny", "pretrain")
    torch.manual_seed(1)
    ft = avfmae.build_model("tiny", "finetune", num_outputs=4)
    wrapped = {"module": {"module." + k: v for k, v in pre.state_dict().items()}}
    missing, unexpected = ft.load_pretrained_encoders(wrapped)
    assert unexpected == []
    assert set(missing) == {"video_layer_weights.weight", "audio_layer_weights.weight", "fc_norm.weight",
                            "fc_norm.bias", "head.weight", "head.bias"}
    own = ft.state_dict()
    for k, v in pre.state_dict().items():
        if k.startswith(("video_encoder.", "audio_encoder.", "fusion.")):
            assert torch.equal(own[k], v), k
    # a pre-training model with HiCMAE's fusion shares the encoders only
    hic = avfmae.build_model("tiny", "pretrain", fusion="hicmae")
    missing, unexpected = ft.load_pretrained_encoders(hic.state_dict())
    assert unexpected and all(k.startswith("fusion.") for k in unexpected)
    assert any(k.startswith("fusion.") for k in missing)
    bad = dict(pre.state_dict())
    bad["video_encoder.region_tokens.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="shape mismatch for video_encoder.region_tokens.weight"):
        ft.load_pretrained_encoders(bad)


def test_no_weight_decay_and_layer_ids(classifier):
    skip = classifier.no_weight_decay()
    assert {"video_encoder.region_tokens.weight", "audio_encoder.region_tokens.weight", "video_layer_weights.weight",
            "fc_norm.weight", "head.bias", "video_encoder.layers.0.local_attn.q_bias"} <= skip
    assert "video_encoder.layers.0.local_attn.qkv_weight" not in skip and "head.weight" not in skip
    depth, top = classifier.cfg.depth, classifier.cfg.depth + classifier.cfg.fusion_depth + 1
    assert classifier.num_layer_ids == top + 1
    assert classifier.layer_id("video_encoder.embed.proj.weight") == 0
    assert classifier.layer_id("audio_encoder.region_tokens.weight") == top  # reference: full rate
    assert classifier.layer_id("audio_encoder.layers.1.mlp.fc1.weight") == 2
    assert classifier.layer_id("video_encoder.norm.weight") == top
    assert classifier.layer_id("fusion.units.0.video.gates.weight") == depth + 1
    assert classifier.layer_id("fusion.units.1.audio.cross_block.attn.q_bias") == depth + 2
    assert classifier.layer_id("fusion.refine.in_proj.weight") == top
    assert classifier.layer_id("head.weight") == top


def test_param_groups_cover_every_parameter_once(classifier):
    groups = classifier.param_groups(weight_decay=0.05, layer_decay=0.75)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(classifier.parameters())) == len({id(p) for p in params})
    depth = classifier.cfg.depth + classifier.cfg.fusion_depth  # the reference's get_num_layers()
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(classifier.named_parameters())
    g = by_param[id(named["video_encoder.layers.0.mlp.fc1.weight"])]
    assert g["weight_decay"] == 0.05 and g["lr_scale"] == pytest.approx(0.75 ** depth)
    g = by_param[id(named["video_encoder.embed.proj.bias"])]
    assert g["weight_decay"] == 0.0 and g["lr_scale"] == pytest.approx(0.75 ** (depth + 1))
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    flat = classifier.param_groups(0.05)
    assert {g["lr_scale"] for g in flat} == {1.0} and len(flat) == 2
    with pytest.raises(ValueError, match="layer_decay"):
        classifier.param_groups(0.05, layer_decay=0.0)


@pytest.mark.parametrize("fusion", ["hicmae", "iavcl_no_dier", "iavcl_no_hafe", "iavcl"])
def test_table5_fusion_variants_build_and_train_a_step(fusion):
    # Table 5's rows: (no DiER, no HAFE) = HiCMAE's fusion, DiER only, HAFE only, both (IAV-CL)
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "finetune", num_outputs=3, drop_path=0.0, fusion=fusion)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    video, audio = inputs(B=4, seed=3)
    target = torch.tensor([0, 1, 2, 1])
    before = model.compute_loss(model(video, audio), target)
    before.backward()
    assert_gradients(model)
    opt.step()
    model.zero_grad()
    assert model.compute_loss(model(video, audio), target) < before
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("fusion.")}
    expected = {"hicmae": {"video_blocks", "audio_blocks", "video_norm", "audio_norm"},
                "iavcl_no_dier": {"units", "av_proj", "hafe"},
                "iavcl_no_hafe": {"units", "video_norm", "audio_norm"},
                "iavcl": {"units", "refine", "hafe"}}[fusion]
    assert names == expected


def test_iavcl_drop_path_follows_the_reference():
    # DiER unit i: drop_path * i / (N_c - 1); HAFE: drop_path / 2; none in the ER layer
    model = avfmae.build_model("tiny", "finetune", num_outputs=3, drop_path=0.1)
    rates = {n: m.p for n, m in model.named_modules() if n.startswith("fusion.") and hasattr(m, "p")}
    assert {rates["fusion.units.0.video.self_block.drop_path"], rates["fusion.units.0.audio.cross_block.drop_path"]} \
        == {0.0}
    assert rates["fusion.units.1.video.cross_block.drop_path"] == pytest.approx(0.1)
    assert rates["fusion.hafe.drop_path"] == rates["fusion.hafe.video_units.drop_path"] == pytest.approx(0.05)
    assert not any(n.startswith("fusion.refine") for n in rates)


def test_psi_transfer_keeps_everything_but_the_head():
    torch.manual_seed(0)
    post = avfmae.build_model("tiny", "finetune", num_outputs=13)
    with torch.no_grad():
        for name in ("video_layer_weights.weight", "audio_layer_weights.weight", "fc_norm.weight", "fc_norm.bias"):
            dict(post.named_parameters())[name].normal_()
    torch.manual_seed(1)
    ft = avfmae.build_model("tiny", "finetune", num_outputs=7)
    missing, unexpected = ft.load_pretrained_encoders({"model": post.state_dict()})
    assert (missing, unexpected) == (["head.bias", "head.weight"], [])
    source = post.state_dict()
    for k, v in ft.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, source[k]), k
    # video-only fine-tuning from an audio-visual classifier: fc_norm's width differs, so it starts fresh
    vo = avfmae.build_model("tiny", "finetune", num_outputs=7, video_only=True)
    missing, _ = vo.load_pretrained_encoders(post.state_dict())
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
