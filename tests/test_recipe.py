"""The shipped recipes (ds_configs/*.json) against the reference release's own scripts.

Reference values below were read from github.com/XuecWu/AVF-MAE (scripts/audio_visual/..., with the
defaults of run_mae_pretraining_av.py / run_class_finetuning_av.py where a script passes nothing);
docs/recipe.md lists every key with its source.
"""

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange

import avfmae
from avfmae.trainer import clip_augmentations, model_arguments
from avfmae.training import ConfigError, load_config, scaled_lrs

from .test_training_config import _load_shipped as load_shipped

ROOT = Path(__file__).resolve().parents[1]
GPUS = 8  # the recipes are written for one 8-GPU node


def global_batch(ds: dict) -> int:
    """The global batch of a shipped DeepSpeed config on GPUS ranks, as the trainer forms it."""
    return ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * GPUS


# config: (per-GPU batch, GPUs, --lr, --min_lr, --clip_grad) of the reference run it reproduces
FINETUNE_REF = (40, 4, 1e-3, 1e-6, 0.0)  # MAFW fine-tuning scripts of every size; min_lr: script default
REFERENCE = {
    # hicmae_pretrain_base/pretrain/final-mix-data-overall-2409/pretrain-base-mix-data-overall-181w-final-model-904.sh
    # (the checkpoint the base fine-tuning scripts load); min_lr: run_mae_pretraining_av.py default
    "base.json": (164, 8, 3e-4, 1e-5, 0.0),
    # hicmae_pretrain_large/pretrain/mix-data-109w/pretrain-large-mix-data-109w-final-model-825.sh
    "large.json": (150, 8, 3e-4, 1e-5, 0.0),
    # huge/pretrain/pretrain-huge-mix-data.sh (--clip_grad 0.7)
    "huge.json": (100, 8, 2e-4, 1e-5, 0.7),
    # the release has no post-pre-training script: the fine-tuning recipe applies
    **{f"{size}_{stage}.json": FINETUNE_REF for size in ("base", "large", "huge")
       for stage in ("postpretrain", "finetune")},
}


def test_every_full_size_config_has_a_reference_row():
    shipped = {p.name for p in (ROOT / "ds_configs").glob("*.json") if not p.name.startswith("tiny")}
    assert shipped == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_effective_lr_peak_and_floor_match_the_reference_at_8_gpus(tmp_path, name):
    per_gpu, gpus, ref_lr, ref_min_lr, _ = REFERENCE[name]
    ref_batch = per_gpu * gpus
    ds, cfg = load_shipped(name, tmp_path)
    batch = global_batch(ds)
    assert batch == ref_batch  # same global batch as the reference run, so the same schedule
    peak, floor = scaled_lrs(cfg, batch)
    # the reference: args.lr = args.lr * total_batch_size / 256 (min_lr alike)
    assert peak == pytest.approx(ref_lr * ref_batch / 256, rel=1e-9)
    assert floor == pytest.approx(ref_min_lr * ref_batch / 256, rel=1e-9)


# pre-training peaks worked by hand from the scripts: 3e-4 * 1312 / 256, 3e-4 * 1200 / 256, 2e-4 * 800 / 256
HAND_PEAKS = {"base.json": 1.5375e-3, "large.json": 1.40625e-3, "huge.json": 6.25e-4}


@pytest.mark.parametrize("name", sorted(HAND_PEAKS))
def test_pretraining_peaks_are_the_reference_values(tmp_path, name):
    # the peak the trainer uses (scaled_lrs of the shipped config at its 8-GPU global batch), not the
    # REFERENCE table above, against the figure worked by hand
    ds, cfg = load_shipped(name, tmp_path)
    batch = global_batch(ds)
    peak, _ = scaled_lrs(cfg, batch)
    assert peak == pytest.approx(HAND_PEAKS[name], rel=1e-9)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_gradient_clipping_follows_the_reference(tmp_path, name):
    ds, _ = load_shipped(name, tmp_path)
    # DeepSpeed clips by default (1.0): the configs must say 0.0 where the reference does not clip
    assert ds["gradient_clipping"] == REFERENCE[name][4]


def test_scaled_lrs_scales_peak_and_floor_alike(tmp_path):
    _, cfg = load_shipped("base_finetune.json", tmp_path)
    peak, floor = scaled_lrs(cfg, 512)
    assert (peak, floor) == pytest.approx((2 * cfg.lr, 2 * cfg.min_lr))
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lrs(cfg, 0)


@pytest.mark.parametrize("name", ["base.json", "large.json", "huge.json", "tiny.json"])
def test_pretraining_configs_reconstruct_frame_differences(tmp_path, name):
    # every reference pre-training script passes --use_frame_diff_as_target; the CPU demo (tiny) keeps
    # plain targets, on which its few steps show the loss falling clearly
    _, cfg = load_shipped(name, tmp_path)
    task, kwargs = model_arguments(cfg)
    assert task == "pretrain" and kwargs["frame_diff_target"] is (name != "tiny.json")


def test_frame_diff_key_changes_the_video_loss_target(tmp_path):
    torch.manual_seed(0)
    video, audio = torch.randn(2, 3, 16, 160, 160), torch.randn(2, 1, 256, 128)
    load_shipped("tiny.json", tmp_path)
    losses = {}
    for flag in (False, True):
        _, cfg = load_config(tmp_path / "ds_configs" / "tiny.json", [f"frame_diff_target={json.dumps(flag)}"])
        task, kwargs = model_arguments(cfg)
        torch.manual_seed(1)  # same weights for both models
        model = avfmae.build_model(cfg.size, task, **kwargs)
        masks = model.sample_masks(2, "cpu", torch.Generator().manual_seed(2))
        out = model(video, audio, masks, return_predictions=True)
        losses[flag] = out
    plain, diff = losses[False], losses[True]
    torch.testing.assert_close(plain["pred_video"], diff["pred_video"])  # same model, same prediction
    torch.testing.assert_close(plain["loss_audio"], diff["loss_audio"])
    # the video term against an independent target: per-channel normalised patches, then frame 1 - frame 0
    patches = rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) c p0 (p1 p2)", p0=2, p1=16, p2=16)
    mean, var = patches.mean(dim=(-2, -1), keepdim=True), patches.var(dim=(-2, -1), unbiased=False, keepdim=True)
    norm = (patches - mean) / (var + 1e-6).sqrt()
    target = torch.cat([norm[..., :1, :], norm[..., 1:, :] - norm[..., :1, :]], dim=-2).flatten(2)
    masks = diff["masks"]
    valid = ~torch.stack([torch.isin(d, v) for d, v in zip(masks.video_decode, masks.video_visible)])
    rows = torch.gather(target, 1, masks.video_decode[..., None].expand(-1, -1, target.shape[-1]))
    err = ((diff["pred_video"] - rows) ** 2).mean(-1)
    torch.testing.assert_close(diff["loss_video"], err[valid].mean(), rtol=1e-4, atol=1e-5)
    assert not torch.isclose(plain["loss_video"], diff["loss_video"])


def test_frame_diff_key_is_pretraining_only(tmp_path):
    load_shipped("tiny_finetune.json", tmp_path)
    with pytest.raises(ConfigError, match="avfmae.frame_diff_target"):
        load_config(tmp_path / "ds_configs" / "tiny_finetune.json", ["frame_diff_target=true"])
    with pytest.raises(ConfigError, match="avfmae.frame_diff_target"):
        load_config(tmp_path / "ds_configs" / "tiny_finetune.json", ["frame_diff_target=1"])


def test_layer_decay_scales_at_base_match_the_reference():
    # reference: scale = 0.75 ** (get_num_layers() + 1 - layer_id), get_num_layers() = depth 10 + fusion depth 2;
    # ids: patch embedding 0, encoder block i -> i + 1, fusion block j -> 10 + j + 1, everything else 13
    with torch.device("meta"):
        model = avfmae.build_model("base", "finetune", num_outputs=7)
    groups = model.param_groups(weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected_exponent = {
        "video_encoder.embed.proj.weight": 13,
        "audio_encoder.embed.proj.bias": 13,
        "video_encoder.layers.0.local_attn.qkv_weight": 12,
        "audio_encoder.layers.0.mlp.fc1.weight": 12,
        "video_encoder.layers.9.r2l_attn.proj.weight": 3,
        "fusion.units.0.video.self_block.attn.qkv_weight": 2,
        "fusion.units.1.audio.gates.weight": 1,
        "video_encoder.region_tokens.weight": 0,
        "audio_encoder.norm.weight": 0,
        "fusion.refine.in_proj.weight": 0,
        "fusion.hafe.feedback_attn.proj.weight": 0,
        "video_layer_weights.weight": 0,
        "fc_norm.weight": 0,
        "head.weight": 0,
    }
    assert set(expected_exponent) <= set(named)
    for name, exponent in expected_exponent.items():
        assert scale[id(named[name])] == pytest.approx(0.75 ** exponent), name


@pytest.mark.parametrize("name", [n for n in sorted(REFERENCE) if "_" in n])
def test_supervised_configs_mix_video_only_like_the_reference(tmp_path, name):
    # engine_for_finetuning_av.py: mixup_fn(samples, targets) gets the video; the audio goes in unmixed
    _, cfg = load_shipped(name, tmp_path)
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_audio) == (0.8, 1.0, False)


def test_ablation_keys_reach_the_model_and_are_validated(tmp_path):
    load_shipped("tiny_finetune.json", tmp_path)
    path = tmp_path / "ds_configs" / "tiny_finetune.json"
    _, cfg = load_config(path, ["fusion=iavcl_no_hafe", "lgi=vanilla"])
    task, kwargs = model_arguments(cfg)
    assert (task, kwargs["fusion"], kwargs["lgi"]) == ("finetune", "iavcl_no_hafe", "vanilla")
    with torch.device("meta"):
        model = avfmae.build_model(cfg.size, task, **kwargs)
    assert (model.cfg.fusion, model.cfg.lgi) == ("iavcl_no_hafe", "vanilla")
    with pytest.raises(ConfigError, match="avfmae.fusion: expected one of"):
        load_config(path, ["fusion=concat"])
    with pytest.raises(ConfigError, match="avfmae.lgi: expected one of"):
        load_config(path, ["lgi=mae_dfer"])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_augmentation_keys_carry_the_reference_values(tmp_path, name):
    from dali_pipelines.augment import RandAugmentSpec

    _, cfg = load_shipped(name, tmp_path)
    spec = clip_augmentations(cfg)
    assert spec["audio_gain"] is True  # --roll_mag_aug: pre-training scripts, fine-tuning default
    if cfg.stage == "pretrain":
        assert (spec["rand_augment"], spec["erase_prob"]) == (None, 0.0)
    else:  # --aa rand-m7-n4-mstd0.5-inc1 --reprob 0.25 --remode pixel --recount 1
        assert spec["rand_augment"] == RandAugmentSpec(n=4, m=7, mstd=0.5, increasing=True)
        assert (spec["erase_prob"], spec["erase_count"], cfg.random_erase_mode) == (0.25, 1, "pixel")


@pytest.mark.parametrize("override,message", [
    ("rand_augment=rand-m12", "avfmae.rand_augment: m must lie in"),
    ("rand_augment=autoaug", "avfmae.rand_augment: expected timm's form"),
    ("random_erase=1.5", "avfmae.random_erase: must be a probability"),
    ("random_erase_count=0", "avfmae.random_erase_count: must be a positive integer"),
    ("random_erase_mode=const", "avfmae.random_erase_mode: only 'pixel'"),
    ("audio_gain=1", "avfmae.audio_gain: must be true or false"),
])
def test_bad_augmentation_keys_name_the_key(tmp_path, override, message):
    load_shipped("tiny_finetune.json", tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "ds_configs" / "tiny_finetune.json", [override])
