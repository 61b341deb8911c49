"""train.py's config handling, lr schedule and crash-safe checkpoint bookkeeping (no DeepSpeed launch)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avfmae.metrics import evaluation_scores
from avfmae.training import (
    CheckpointManager,
    ConfigError,
    apply_overrides,
    atomic_write_text,
    average_views,
    eval_views,
    load_config,
    lr_at,
)
from tests.helpers.train_configs import write_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_splits_deepspeed_keys_and_resolves_paths(tmp_path):
    ds, cfg = load_config(write_config(tmp_path, mask={"video_ratio": 0.9}, betas=[0.9, 0.95]))
    assert ds == {"train_micro_batch_size_per_gpu": 2}
    assert cfg.size == "tiny" and cfg.mask.video_ratio == 0.9 and cfg.betas == (0.9, 0.95)
    assert cfg.train_manifest == str(tmp_path / "train.csv") and cfg.output_dir == str(tmp_path / "out")


@pytest.mark.parametrize("section, message", [
    ({"size": "gigantic"}, "avfmae.size: expected one of"),
    ({"stage": "distill"}, "avfmae.stage: expected one of"),
    ({"stage": "finetune"}, "avfmae.num_outputs"),
    ({"train_manifest": "missing.csv"}, "avfmae.train_manifest: file not found"),
    ({"train_manifest": "."}, r"avfmae.train_manifest: file not found: .* \(a directory\)"),
    ({"lr": -1}, "avfmae.lr: must be a positive number"),
    ({"layer_decay": 1.5}, "avfmae.layer_decay"),
    ({"mask": {"video_ratio": 1.0}}, "avfmae.mask.video_ratio"),
    ({"mask": {"ratio": 0.5}}, "avfmae.mask"),
    ({"betas": [0.9]}, "avfmae.betas"),
    ({"warmup_epochs": 5, "epochs": 2}, "avfmae.warmup_epochs"),
    ({"warmup_epochs": 2, "epochs": 2}, r"avfmae.warmup_epochs: must lie in \[0, epochs=2\), got 2"),
    # values the model refuses: named at load, not after process-group init and the media probe
    ({"mask": {"video_ratio": 0.85}}, r"avfmae.mask.video_ratio: the tiny model refuses it: video_mask_ratio"),
    ({"mask": {"audio_decoder_ratio": 0.3}}, "avfmae.mask.audio_decoder_ratio: the tiny model refuses it"),
    ({"image_size": 100}, r"avfmae.image_size: the tiny model refuses it: video 16x100\^2 must divide"),
    ({"image_size": 64}, r"avfmae.image_size: .*video_region \(2, 5, 10\) must tile the token grid \(8, 4, 4\)"),
    ({"audio_frames": 128}, r"avfmae.audio_frames: .*pairs each video region with an audio region"),
    ({"num_frames": 15}, "avfmae.num_frames: the tiny model refuses it"),
    ({"stop_at_step": 0}, "avfmae.stop_at_step"),
    ({"learning_rate": 1e-3}, "unknown keys in the avfmae section: \\['learning_rate'\\]"),
    ({"test_clips": 0}, "avfmae.test_clips: must be a positive integer, got 0"),
    ({"test_crops": 1.5}, "avfmae.test_crops: must be an integer, got 1.5"),
    ({"test_crops": True}, "avfmae.test_crops: must be an integer, got True"),
    ({"test_clips": "2"}, "avfmae.test_clips: must be an integer, got '2'"),
    ({"data_video_decoder": "decord"}, r"avfmae.data_video_decoder: expected one of \('dali', 'torchcodec'\)"),
    ({"data_video_decoder": "torchcodec", "data_device": "gpu"}, "avfmae.data_video_decoder: 'torchcodec' decodes"),
])
def test_bad_configs_name_the_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **section))


def test_warmup_may_fill_all_but_part_of_the_last_epoch(tmp_path):
    _, cfg = load_config(write_config(tmp_path, warmup_epochs=1.5, epochs=2))
    assert cfg.warmup_epochs == 1.5


def test_fine_tuning_checks_only_the_model_keys_it_passes(tmp_path):
    """The mask ratios are pre-training settings (the classifier keeps ModelConfig's): a fine-tuning
    config is not refused for them, and its model arguments are what the check built."""
    from avfmae import build_model
    from avfmae.train_config import model_arguments

    _, cfg = load_config(write_config(tmp_path, stage="finetune", num_outputs=4, mask={"video_ratio": 0.85},
                                      drop_path=0.2))
    task, kwargs = model_arguments(cfg)
    assert task == "finetune" and "video_mask_ratio" not in kwargs
    assert build_model("tiny", task, **kwargs).cfg.drop_path == 0.2


FINETUNE = {"stage": "finetune", "num_outputs": 4}


@pytest.mark.parametrize("section, message", [
    ({**FINETUNE, "mixup": -0.5}, "avfmae.mixup: must be >= 0"),
    ({**FINETUNE, "cutmix": "strong"}, "avfmae.cutmix: must be a number"),
    ({**FINETUNE, "mixup": True}, "avfmae.mixup: must be a number"),
    ({**FINETUNE, "mixup_switch_prob": 1.5}, "avfmae.mixup_switch_prob: must lie in \\[0, 1\\]"),
    ({**FINETUNE, "mixup_audio": "yes"}, "avfmae.mixup_audio: must be true or false"),
    ({**FINETUNE, "label_smoothing": 1.0}, "avfmae.label_smoothing: must lie in \\[0, 1\\)"),
    ({"mixup": 0.8}, "avfmae.mixup: mixup/cutmix apply to the supervised stages"),
    ({"cutmix": 1.0}, "avfmae.cutmix: mixup/cutmix apply to the supervised stages"),
    ({**FINETUNE, "regression": True, "cutmix": 1.0}, "avfmae.cutmix: .*regression stages never mix"),
])
def test_bad_mixup_keys_name_the_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **section))


def test_mixup_keys_default_off_and_need_an_even_micro_batch(tmp_path):
    _, cfg = load_config(write_config(tmp_path, **FINETUNE))
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.0, 0.0, 0.5)
    _, cfg = load_config(write_config(tmp_path, **FINETUNE, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.25))
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.8, 1.0, 0.25)
    path = write_config(tmp_path, **FINETUNE, cutmix=1.0)
    raw = json.loads(path.read_text())
    raw["train_micro_batch_size_per_gpu"] = 3
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu: .*even micro-batch, got 3"):
        load_config(path)
    load_config(path, ["cutmix=0"])  # odd batches are fine without mixing


def _load_shipped(name: str, root: Path) -> tuple[dict, object]:
    """Load ds_configs/<name> from a copy under ``root`` with empty files where its paths point."""
    raw = json.loads((ROOT / "ds_configs" / name).read_text())
    path = root / "ds_configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    for key in ("train_manifest", "val_manifest", "init_checkpoint"):
        if raw["avfmae"].get(key):
            target = path.parent / raw["avfmae"][key]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    return load_config(path)


SHIPPED = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(tmp_path, name):
    ds, cfg = _load_shipped(name, tmp_path)
    assert "avfmae" not in ds and ds["train_micro_batch_size_per_gpu"] >= 1
    assert name.startswith(cfg.size)
    assert Path(cfg.output_dir).resolve().parent == (tmp_path / "runs").resolve()  # the repo's runs/


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_psi_stage_configs_chain_and_follow_the_fine_tuning_recipe(tmp_path, size):
    configs = {stage: _load_shipped(name, tmp_path) for stage, name in
               [("pretrain", f"{size}.json"), ("postpretrain", f"{size}_postpretrain.json"),
                ("finetune", f"{size}_finetune.json")]}
    for earlier, later in [("pretrain", "postpretrain"), ("postpretrain", "finetune")]:
        assert configs[later][1].stage == later and configs[later][1].size == size
        previous_export = Path(configs[earlier][1].output_dir).resolve() / "model_fp32.pt"
        assert Path(configs[later][1].init_checkpoint).resolve() == previous_export
    for stage in ("postpretrain", "finetune"):
        ds, cfg = configs[stage]
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
        assert ds["train_micro_batch_size_per_gpu"] % 2 == 0
        assert ds["gradient_clipping"] == 0.0  # the reference fine-tunes without clipping (test_recipe.py)
        assert cfg.betas == (0.9, 0.999) and cfg.layer_decay == 0.75 and cfg.drop_path == 0.1
        assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
        assert (cfg.lr, cfg.lr_batch, cfg.warmup_epochs) == (1e-3, 256, 5)
        assert cfg.activation_checkpointing == configs["pretrain"][1].activation_checkpointing
        assert (cfg.test_clips, cfg.test_crops) == (2, 2)  # the reference recipe's "2 clips x 2 crops"
    assert configs["finetune"][1].num_outputs == 7 and configs["finetune"][1].epochs == 100
    assert configs["postpretrain"][1].epochs < configs["finetune"][1].epochs


def test_test_views_default_to_one_and_cover_every_clip_crop_pair(tmp_path):
    _, cfg = load_config(write_config(tmp_path, **FINETUNE))
    assert (cfg.test_clips, cfg.test_crops) == (1, 1) and eval_views(cfg) == [None]
    _, demo = _load_shipped("tiny_finetune.json", tmp_path)
    assert eval_views(demo) == [None]  # the demo stays a single pass
    _, cfg = load_config(write_config(tmp_path, **FINETUNE, test_clips=2, test_crops=3))
    views = eval_views(cfg)
    assert sorted(views) == [(c, 2, k, 3) for c in range(2) for k in range(3)]


def test_average_views_means_softmax_probabilities_or_regression_outputs():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 4)) * 3 for _ in range(4)]
    probs = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits]
    got = average_views([torch.tensor(x) for x in logits], regression=False)
    np.testing.assert_allclose(got.numpy(), np.mean(probs, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), np.ones(5), rtol=1e-5)
    got = average_views([torch.tensor(x) for x in logits], regression=True)
    np.testing.assert_allclose(got.numpy(), np.mean(logits, axis=0), rtol=1e-5, atol=1e-6)
    single = torch.tensor(logits[0])
    assert average_views([single], regression=False) is single  # 1 x 1: scores exactly as before


def test_averaged_probabilities_differ_from_averaged_logits():
    # view 1 is confidently wrong in its logits but only mildly in probability; averaging
    # probabilities (the reference merge) keeps class 0, averaging logits would pick class 1
    views = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]]), torch.tensor([[2.0, 0.0]])]
    assert average_views(views, regression=False).argmax(1).item() == 0
    assert torch.stack(views).mean(0).argmax(1).item() == 1
    scores, key = evaluation_scores(torch.tensor([0]), average_views(views, regression=False))
    assert key == "war" and scores["war"] == 1.0


def test_average_views_rejects_mismatched_or_missing_views():
    with pytest.raises(ValueError, match="outputs"):
        average_views([torch.zeros(3, 4), torch.zeros(2, 4)], regression=False)
    with pytest.raises(ValueError, match="outputs"):
        average_views([], regression=True)


def test_missing_section_and_deepspeed_key(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(ConfigError, match="'avfmae' section"):
        load_config(path)
    cfg = write_config(tmp_path)
    raw = json.loads(cfg.read_text())
    del raw["train_micro_batch_size_per_gpu"]
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_config(cfg)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


@pytest.mark.parametrize("key", ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                 "train_batch_size"])
def test_batch_counts_must_be_json_integers(tmp_path, key):
    """8.0 passed as 8 before and reached the trainer as a float (its global batch, the even check)."""
    cfg = write_config(tmp_path)
    raw = json.loads(cfg.read_text())
    raw[key] = 8.0
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"config key {key}: must be an integer >= 1, got 8.0 \\(float\\)"):
        load_config(cfg)


def test_overrides_parse_json_and_nest(tmp_path):
    section = apply_overrides({"epochs": 1, "mask": {}}, ["epochs=3", "mask.audio_ratio=0.75", "size=base"])
    assert section == {"epochs": 3, "mask": {"audio_ratio": 0.75}, "size": "base"}
    _, cfg = load_config(write_config(tmp_path), ["max_steps=7"])
    assert cfg.max_steps == 7
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["epochs"])


def test_train_py_rejects_a_bad_config_before_starting(tmp_path):
    path = write_config(tmp_path, size="gigantic")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bad config: config key avfmae.size: expected one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_lr_schedule_warms_up_then_follows_the_cosine():
    peak, low = 1e-3, 1e-5
    lrs = [lr_at(s, 100, 10, peak, low) for s in range(100)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert lrs[10] == pytest.approx(peak)
    assert lrs[55] == pytest.approx(low + 0.5 * (peak - low))  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, peak, low) == pytest.approx(low)


class FakeEngine:
    """Writes a tag directory like DeepSpeed; can be told to die half-way through a save."""

    def __init__(self):
        self.crash = False

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False  # the manager owns `latest`
        path = Path(directory) / tag
        path.mkdir()
        (path / "part0").write_text(json.dumps(client_state))
        if self.crash:
            raise RuntimeError("killed mid-save")
        (path / "part1").write_text("done")


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    manager, engine = CheckpointManager(tmp_path, keep=2), FakeEngine()
    for step in (1, 2, 3):
        manager.save(engine, step, {"step": step}, is_rank0=True, barrier=lambda: None)
    assert manager.latest_tag() == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    engine.crash = True
    with pytest.raises(RuntimeError):
        manager.save(engine, 4, {"step": 4}, is_rank0=True, barrier=lambda: None)
    assert manager.latest_tag() == "step_00000003"
    assert (tmp_path / "step_00000003" / "part1").exists()


def test_latest_pointing_at_a_missing_tag_is_ignored(tmp_path):
    atomic_write_text(tmp_path / "latest", "step_00000009")
    assert (tmp_path / "latest").read_text() == "step_00000009"
    assert CheckpointManager(tmp_path).latest_tag() is None
    assert not list(tmp_path.glob(".latest.tmp*"))


def test_a_config_without_a_mask_section_trains_the_papers_mask_ratios(tmp_path):
    from avfmae import build_model
    from avfmae.trainer import model_arguments

    _, train = load_config(write_config(tmp_path))
    task, kwargs = model_arguments(train)
    cfg = build_model("tiny", task, **kwargs).cfg
    # Paper §3.1-3.2 / DESIGN.md: encoder masks 90% of the video tubes and 13 of 16 audio patches per
    # region (the paper's 80%, rounded to whole patches); the decoder masks keep half of the tokens.
    assert (cfg.video_mask_ratio, cfg.audio_mask_ratio) == (0.9, 0.8125)
    assert (cfg.video_decoder_mask_ratio, cfg.audio_decoder_mask_ratio) == (0.5, 0.5)
    _, custom = load_config(write_config(tmp_path, mask={"video_ratio": 0.8}))
    assert build_model("tiny", task, **model_arguments(custom)[1]).cfg.video_mask_ratio == 0.8
