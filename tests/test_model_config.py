"""Configurations, build_model and the paper's parameter counts (counted on the meta device)."""

import dataclasses

import pytest
import torch

import avfmae
from avfmae.config import CONFIGS, ModelConfig, get_config


def count_params(size, task, **kwargs):
    with torch.device("meta"):
        model = avfmae.build_model(size, task, **kwargs)
    return sum(p.numel() for p in model.parameters())


# DESIGN.md's size table
@pytest.mark.parametrize("size,dim,heads,depth,dec,hcmcl", [
    ("base", 512, 8, 10, (384, 6, 4), (3, 6, 9)),
    ("large", 640, 10, 12, (512, 8, 4), (3, 7, 11)),
    ("huge", 768, 12, 15, (640, 8, 4), (4, 9, 14)),
    ("tiny", 64, 2, 3, (32, 2, 2), (1,)),
])
def test_size_table(size, dim, heads, depth, dec, hcmcl):
    c = get_config(size)
    assert (c.embed_dim, c.num_heads, c.depth) == (dim, heads, depth)
    assert (c.decoder_dim, c.decoder_heads, c.decoder_depth) == dec
    assert c.hcmcl_layers == hcmcl
    assert (c.mlp_ratio, c.qkv_bias, c.norm_eps, c.fusion_depth) == (4.0, True, 1e-6, 2)


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


def test_model_config_is_the_registry_type():
    assert all(isinstance(c, ModelConfig) and c.name == k for k, c in CONFIGS.items())
