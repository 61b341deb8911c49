"""Configurations, build_model and the paper's parameter counts (counted on the meta device)."""

import dataclasses

import pytest
import torch

import avfmae
from avfmae.config import CONFIGS, get_config


def count_params(size, task, **kwargs):
    with torch.device("meta"):
        model = avfmae.build_model(size, task, **kwargs)
    return sum(p.numel() for p in model.parameters())


def lgi_layer_params(C, mlp_ratio=4.0):
    """One improved LGI-Former layer, written out from its parts (not read from the model): four attention
    modules (qkv / q+kv and output projections: 4C^2, with q, v and output biases: 3C), seven LayerNorms
    (local, region, l2r q/kv, r2l q/kv, MLP: 2C each) and one MLP C -> hC -> C."""
    h = int(mlp_ratio * C)
    return 4 * (4 * C * C + 3 * C) + 7 * 2 * C + (C * h + h) + (h * C + C)


def vit_block_params(C, mlp_ratio=4.0):
    """A pre-norm ViT block: fused qkv (q, v biases) + projection, two LayerNorms and the MLP."""
    h = int(mlp_ratio * C)
    return (4 * C * C + 3 * C) + 2 * 2 * C + (C * h + h) + (h * C + C)


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_encoder_heads_are_64_wide_like_vit(size):
    # ViT / VideoMAE / HiCMAE (and the paper's encoders) use 64-wide attention heads at every width; read
    # from the built attention modules, so a head-count change in the table shows up here
    with torch.device("meta"):
        model = avfmae.build_model(size, "pretrain")
    C = model.video_encoder.embed.proj.weight.shape[0]
    heads = {mod.num_heads for mod in model.video_encoder.layers.modules() if hasattr(mod, "num_heads")}
    assert len(heads) == 1 and C // heads.pop() == 64


@pytest.mark.parametrize("size", ["tiny", "base", "large", "huge"])
def test_built_layers_match_the_parameter_formula(size):
    with torch.device("meta"):
        model = avfmae.build_model(size, "pretrain")
    for encoder in (model.video_encoder, model.audio_encoder):
        C = encoder.embed.proj.weight.shape[0]
        for layer in encoder.layers:
            assert sum(p.numel() for p in layer.parameters()) == lgi_layer_params(C)
    for decoder in (model.video_decoder, model.audio_decoder):
        D = decoder.encoder_to_decoder.weight.shape[0]
        # block 0 is a ViT block; every later block adds a cross-attention to one skip-connected encoder
        # layer (HiCMAE's hierarchical skips): attention 4D^2 + 3D and two LayerNorms (q, kv)
        expected = [vit_block_params(D)] + [vit_block_params(D) + 4 * D * D + 3 * D + 2 * 2 * D] * (
            len(decoder.blocks) - 1)
        assert [sum(p.numel() for p in block.parameters()) for block in decoder.blocks] == expected
    # one decoder block per hierarchical skip connection plus the first
    assert len(model.video_encoder.layers) == len(model.audio_encoder.layers)
    assert len(model.video_decoder.blocks) == len(model.cfg.hcmcl_layers) + 1


def test_default_geometry_matches_design():
    c = get_config("base")
    assert c.video_grid == (8, 10, 10) and c.num_video_tokens == 800
    assert c.audio_grid == (16, 8) and c.num_audio_tokens == 128
    assert c.num_video_regions == 8 and c.num_audio_regions == 8
    assert c.video_patch_dim == 1536 and c.audio_patch_dim == 256
    assert (c.hcmcl_weight, c.temperature) == (0.0025, 0.07)


@pytest.mark.parametrize("size,task,kwargs,paper_millions", [
    ("base", "finetune", {"num_outputs": 7}, 169),
    ("large", "finetune", {"num_outputs": 7}, 303),
    ("huge", "finetune", {"num_outputs": 7}, 521),
    # Table 4: dual masking + improved LGI-Former with HiCMAE's fusion (see config.py docstring)
    ("base", "pretrain", {"fusion": "hicmae"}, 163),
    # Table 4's middle row: dual masking + vanilla LGI-Former (no stage IV), HiCMAE's fusion
    ("base", "pretrain", {"fusion": "hicmae", "lgi": "vanilla"}, 142),
    # HiCMAE's own pre-training model: 99.6M in its public code (Table 4 rounds to 99M)
    ("base", "hicmae_pretrain", {}, 99.6),
])
def test_parameter_counts_match_paper(size, task, kwargs, paper_millions):
    n = count_params(size, task, **kwargs)
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.05, f"{n / 1e6:.2f}M vs {paper_millions}M"


def test_vanilla_lgi_drops_exactly_the_stage_iv_attention():
    # stage IV per layer: fused q / kv projections + output projection (4 C^2 + q, v, proj biases) and 2 norms
    c = get_config("base")
    C, layers = c.embed_dim, 2 * c.depth
    diff = count_params("base", "pretrain", fusion="hicmae") - count_params("base", "pretrain", fusion="hicmae",
                                                                            lgi="vanilla")
    assert diff == layers * (4 * C * C + 3 * C + 4 * C)


def test_pretrain_model_is_table4_model_plus_iavcl_instead_of_hicmae_fusion():
    # the full AVF-MAE++ pre-training model swaps HiCMAE's fusion (~64 C^2) for IAV-CL (~160 C^2)
    C = get_config("base").embed_dim
    diff = count_params("base", "pretrain") - count_params("base", "pretrain", fusion="hicmae")
    assert abs(diff - 96 * C * C) / (96 * C * C) < 0.02


@pytest.mark.parametrize("bad,match", [
    ({"num_heads": 7}, "multiple of its head count"),
    ({"lgi": "plain"}, "lgi must be one of"),
    ({"decoder_dim": 48, "decoder_heads": 2}, "head dim 24"),
    ({"hcmcl_layers": (1, 2)}, "decoder_depth - 1"),
    ({"hcmcl_layers": (3,)}, "below depth"),
    ({"image_size": 150}, "divide into tubelets"),
    ({"video_region": (3, 5, 10)}, "tile the token grid"),
    ({"video_mask_ratio": 0.85}, "whole number"),
    ({"audio_mask_ratio": 0.8}, "whole number"),
    ({"video_decoder_mask_ratio": 0.6}, "whole number"),
    ({"fusion": "concat"}, "fusion must be one of"),
    ({"drop_path": 1.0}, "drop_path"),
])
def test_inconsistent_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", **bad)


@pytest.mark.parametrize("fusion", ["iavcl", "iavcl_no_dier", "iavcl_no_hafe"])
def test_iavcl_needs_as_many_audio_regions_as_video_regions(fusion):
    """audio_region (2, 4) tiles the audio grid (16 regions against the video's 8) and its mask ratio
    keeps whole patches, so it used to build and fail at the first forward (IAV-CL concatenates region
    k of each modality)."""
    with pytest.raises(ValueError, match=r"pairs each video region with an audio region: .* makes 8 .* 16 of"):
        get_config("tiny", audio_region=(2, 4), audio_mask_ratio=0.75, fusion=fusion)
    c = get_config("tiny", audio_region=(2, 4), audio_mask_ratio=0.75, fusion="hicmae")  # pairs nothing
    assert (c.num_video_regions, c.num_audio_regions) == (8, 16)


def test_config_is_frozen_and_overridable():
    c = get_config("tiny", image_size=64, video_region=(2, 2, 4), video_mask_ratio=0.875)
    assert c.video_grid == (8, 4, 4) and c.num_video_regions == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.depth = 5  # type: ignore[misc]
    assert CONFIGS["tiny"].image_size == 160  # the registry is untouched


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model size"):
        avfmae.build_model("giant")
    with pytest.raises(ValueError, match="unknown task"):
        avfmae.build_model("tiny", "distill")
    with pytest.raises(ValueError, match="num_outputs is required"):
        avfmae.build_model("tiny", "finetune")
    with pytest.raises(ValueError, match="finetune' only"):
        avfmae.build_model("tiny", "pretrain", num_outputs=3)
    with pytest.raises(ValueError, match="unknown config field"):
        avfmae.build_model("tiny", "pretrain", embed_dims=12)
    with pytest.raises(ValueError, match="num_outputs must be a positive integer"):
        avfmae.build_model("tiny", "finetune", num_outputs=0)


def test_build_model_types_and_finetune_drop_path():
    assert isinstance(avfmae.build_model("tiny"), avfmae.AVFMAEPretrain)
    assert isinstance(avfmae.build_model("tiny", "hicmae_pretrain"), avfmae.HiCMAEBaseline)
    ft = avfmae.build_model("tiny", "finetune", num_outputs=3)
    assert isinstance(ft, avfmae.AVFMAEClassifier) and ft.cfg.drop_path == 0.1
    assert ft.video_encoder.layers[-1].drop_path.p == pytest.approx(0.1)
    assert avfmae.build_model("tiny", "finetune", num_outputs=3, drop_path=0.0).cfg.drop_path == 0.0


def test_registry_names_and_build_model_use_the_registry_entry():
    for size, cfg in CONFIGS.items():
        assert cfg.name == size
        with torch.device("meta"):
            model = avfmae.build_model(size, "pretrain")
        assert model.cfg == cfg and len(model.video_encoder.layers) == cfg.depth
