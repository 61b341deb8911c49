"""The training config: one JSON = DeepSpeed's keys + an ``avfmae`` section.

``load_config`` validates the section into a frozen :class:`TrainConfig` (every key's type and range,
cross-key rules) and the DeepSpeed keys the trainer relies on, before any process group does work; only
DeepSpeed's keys go on to DeepSpeed. Bad input is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FUSIONS, LGI_LAYERS

STAGES = ("pretrain", "postpretrain", "finetune")
PATH_KEYS = ("train_manifest", "val_manifest", "init_checkpoint", "output_dir")
SIZES = ("tiny", "base", "large", "huge")


@dataclass(frozen=True)
class MaskConfig:
    video_ratio: float = 0.9
    audio_ratio: float = 0.8125
    video_decoder_ratio: float = 0.5
    audio_decoder_ratio: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """The ``avfmae`` section of a training config. Paths are relative to the config file."""

    size: str
    stage: str
    output_dir: str
    train_manifest: str | None = None
    val_manifest: str | None = None
    num_outputs: int = 0                 # classes (or regression targets); 0 for pre-training
    regression: bool = False
    video_only: bool = False
    epochs: int = 1
    max_steps: int | None = None         # stop early (demo, smoke runs); None = all epochs
    stop_at_step: int | None = None      # checkpoint and exit at this step, schedule unchanged (job slices)
    warmup_epochs: float = 0.0
    lr: float = 1e-3                     # peak learning rate at global batch `lr_batch`
    lr_batch: int = 256                  # linear scaling: actual lr = lr * global_batch / lr_batch
    min_lr: float = 1e-5                 # cosine floor at global batch `lr_batch` (scaled like lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float | None = None     # fine-tuning: lr * layer_decay ** (top id - layer id), see Model.layer_id
    drop_path: float | None = None      # stochastic depth; None: build_model's default for the task (its owner)
    label_smoothing: float = 0.0
    mixup: float = 0.0                   # mixup Beta(α, α) of the supervised stages; 0 = off
    cutmix: float = 0.0                  # CutMix Beta(α, α); 0 = off
    mixup_switch_prob: float = 0.5       # chance of CutMix instead of mixup when both are on
    mixup_audio: bool = False            # also mix the audio (same pairs and λ); reference code: video only
    activation_checkpointing: bool = False
    frame_diff_target: bool = False      # pre-training video target: frame 0, then frame j - frame 0 per tubelet
    rand_augment: str | None = None      # training video RandAugment, timm's string ("rand-m7-n4-mstd0.5-inc1")
    random_erase: float = 0.0            # probability of erasing a box (the same in every frame) of a clip
    random_erase_count: int = 1          # boxes per erased clip
    random_erase_mode: str = "pixel"     # fill: per-pixel standard-normal noise (the reference's "pixel")
    audio_gain: bool = False             # waveform x (Beta(10, 10) + 0.5): the reference's roll_mag_aug in effect
    fusion: str = "iavcl"                # ablations: "hicmae" (Tables 4/5), "iavcl_no_dier", "iavcl_no_hafe" (Table 5)
    lgi: str = "improved"                # "vanilla": LGI layers without stage IV (Table 4's middle row)
    mask: MaskConfig = field(default_factory=MaskConfig)
    init_checkpoint: str | None = None
    seed: int = 0
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    eval_every_epochs: int = 1
    test_clips: int = 1                  # evaluation: temporal windows per clip (reference recipe: 2)
    test_crops: int = 1                  # evaluation: spatial crops per window (reference recipe: 2)
    data_threads: int = 2
    data_device: str = "auto"            # "gpu" | "cpu" | "auto" (gpu when CUDA is available)
    data_video_decoder: str = "dali"     # "dali" | "torchcodec" (CPU: any FFmpeg codec, e.g. H.264 as shipped)
    num_frames: int | None = None        # input geometry overrides (None: the model config's)
    image_size: int | None = None
    audio_frames: int | None = None
    reconstruction_png: bool = True
    compile: str = "off"                 # torch.compile the model: one of COMPILE_MODES
    compile_backend: str = "inductor"    # "aot_eager" traces fwd+bwd without generating code (CPU tests)
    max_nonfinite_steps: int = 3         # stop (exit 3, no save, no export) after this many non-finite steps in a row
    bad_clips: str = "error"             # a clip failing the media checks: "error" (stop, naming it) | "skip" (log it)
    max_bad_clip_fraction: float = 0.01  # with "skip": fail when more than this share of the clips is bad

    def resolve(self, path: str | None, base: Path) -> str | None:
        if path is None:
            return None
        p = Path(path)
        return str(p if p.is_absolute() else (base / p))


# "off", or a torch.compile mode ("default", "reduce-overhead" = CUDA graphs, ...): README "Compiling the step"
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


class ConfigError(ValueError):
    """A training config that cannot run; the message names the key and what was expected."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key avfmae.{key}: {msg}")


def parse_train_config(section: Any, base: Path) -> TrainConfig:
    if not isinstance(section, dict):
        raise ConfigError("the config needs an 'avfmae' section (a JSON object) next to DeepSpeed's keys")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown keys in the avfmae section: {unknown}; known keys: {sorted(known)}")
    for key in ("size", "stage", "output_dir"):
        if key not in section:
            _fail(key, "is required")
    values = dict(section)
    mask = values.pop("mask", {}) or {}
    if not isinstance(mask, dict) or set(mask) - {f.name for f in dataclasses.fields(MaskConfig)}:
        _fail("mask", f"expected an object with keys {[f.name for f in dataclasses.fields(MaskConfig)]}, "
                      f"got {mask!r}")
    if "betas" in values:
        betas = values["betas"]
        numbers = isinstance(betas, list) and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                  for b in betas)
        if not (numbers and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            _fail("betas", f"expected two numbers in [0, 1), got {betas!r}")
        values["betas"] = tuple(betas)
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key != "betas":
            _check_type(key, value, hints[key])
    mask_hints = typing.get_type_hints(MaskConfig)
    for key, value in mask.items():
        _check_type(f"mask.{key}", value, mask_hints[key])
    try:
        cfg = TrainConfig(**values, mask=MaskConfig(**mask))
    except TypeError as err:
        raise ConfigError(f"avfmae section: {err}") from err
    _validate(cfg, base)
    return cfg


def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _check_type(key: str, value: Any, hint: Any) -> None:
    """``value`` against the field's annotation: int (not bool), float (int or float, finite), bool, str,
    and ``X | None``; other annotations are checked by the field's own rule."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            return
        hint, optional = kinds[0], " or null"
    else:
        optional = ""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        _fail(key, f"must be {_type_name(hint)}{optional}, got {value!r} ({type(value).__name__})")


def _validate(cfg: TrainConfig, base: Path) -> None:
    if cfg.size not in SIZES:
        _fail("size", f"expected one of {SIZES}, got {cfg.size!r}")
    if cfg.stage not in STAGES:
        _fail("stage", f"expected one of {STAGES}, got {cfg.stage!r}")
    if cfg.stage != "pretrain" and cfg.num_outputs < 1:
        _fail("num_outputs", f"stage {cfg.stage!r} needs the number of classes/targets (>= 1)")
    if cfg.stage == "pretrain" and cfg.video_only:
        _fail("video_only", "pre-training is audio-visual; video_only applies to fine-tuning")
    if cfg.train_manifest is None:
        _fail("train_manifest", "is required")
    for key in ("train_manifest", "val_manifest", "init_checkpoint"):
        path = cfg.resolve(getattr(cfg, key), base)
        if path is not None and not Path(path).exists():
            _fail(key, f"file not found: {path}")
    positive = {"epochs": cfg.epochs, "lr": cfg.lr, "lr_batch": cfg.lr_batch,
                "checkpoint_every_steps": cfg.checkpoint_every_steps, "keep_checkpoints": cfg.keep_checkpoints,
                "log_every_steps": cfg.log_every_steps, "data_threads": cfg.data_threads,
                "eval_every_epochs": cfg.eval_every_epochs, "max_nonfinite_steps": cfg.max_nonfinite_steps}
    for key, value in positive.items():
        if not (isinstance(value, (int, float)) and value > 0):
            _fail(key, f"must be a positive number, got {value!r}")
    for key in ("test_clips", "test_crops"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(key, f"must be a positive integer, got {value!r}")
    for key in ("max_steps", "stop_at_step"):
        value = getattr(cfg, key)
        if value is not None and not (isinstance(value, int) and value >= 1):
            _fail(key, f"must be an integer >= 1 or null, got {value!r}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        _fail("min_lr", f"must lie in [0, lr={cfg.lr}], got {cfg.min_lr}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs + 1e-9:
        _fail("warmup_epochs", f"must lie in [0, epochs={cfg.epochs}), got {cfg.warmup_epochs}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        _fail("layer_decay", f"must lie in (0, 1], got {cfg.layer_decay}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        _fail("drop_path", f"must lie in [0, 1), got {cfg.drop_path}")
    _validate_mixing(cfg)
    if cfg.compile not in COMPILE_MODES:
        _fail("compile", f"expected one of {COMPILE_MODES}, got {cfg.compile!r}")
    if cfg.compile_backend not in COMPILE_BACKENDS:
        _fail("compile_backend", f"expected one of {COMPILE_BACKENDS}, got {cfg.compile_backend!r}")
    if cfg.bad_clips not in ("error", "skip"):
        _fail("bad_clips", f"expected 'error' or 'skip', got {cfg.bad_clips!r}")
    if not 0 <= cfg.max_bad_clip_fraction < 1:
        _fail("max_bad_clip_fraction", f"must lie in [0, 1), got {cfg.max_bad_clip_fraction}")
    _validate_augmentation(cfg)
    if cfg.fusion not in FUSIONS:
        _fail("fusion", f"expected one of {FUSIONS}, got {cfg.fusion!r}")
    if cfg.lgi not in LGI_LAYERS:
        _fail("lgi", f"expected one of {LGI_LAYERS}, got {cfg.lgi!r}")
    if not isinstance(cfg.frame_diff_target, bool):
        _fail("frame_diff_target", f"must be true or false, got {cfg.frame_diff_target!r}")
    if cfg.frame_diff_target and cfg.stage != "pretrain":
        _fail("frame_diff_target", "is a pre-training reconstruction target; the supervised stages have none")
    if cfg.data_device not in ("auto", "gpu", "cpu"):
        _fail("data_device", f"expected 'auto', 'gpu' or 'cpu', got {cfg.data_device!r}")
    if cfg.data_video_decoder not in ("dali", "torchcodec"):
        _fail("data_video_decoder", f"expected 'dali' or 'torchcodec' (CPU only), got {cfg.data_video_decoder!r}")
    if cfg.data_video_decoder == "torchcodec" and cfg.data_device == "gpu":
        _fail("data_video_decoder", "'torchcodec' decodes on the CPU (data_device 'cpu'); on the GPU DALI decodes "
                                    "with NVDEC")
    for key in dataclasses.fields(MaskConfig):
        value = getattr(cfg.mask, key.name)
        if not 0 < value < 1:
            _fail(f"mask.{key.name}", f"must lie in (0, 1), got {value}")


def _validate_augmentation(cfg: TrainConfig) -> None:
    if cfg.rand_augment is not None:
        from dali_pipelines.augment import RandAugmentSpec

        try:
            RandAugmentSpec.parse(cfg.rand_augment)
        except ValueError as err:
            _fail("rand_augment", str(err).removeprefix("rand_augment: "))
    erase = cfg.random_erase
    if isinstance(erase, bool) or not isinstance(erase, (int, float)) or not 0 <= erase <= 1:
        _fail("random_erase", f"must be a probability in [0, 1], got {erase!r}")
    count = cfg.random_erase_count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        _fail("random_erase_count", f"must be a positive integer, got {count!r}")
    if cfg.random_erase_mode != "pixel":
        _fail("random_erase_mode", f"only 'pixel' (per-pixel normal noise, the reference's) is implemented, "
                                   f"got {cfg.random_erase_mode!r}")
    if not isinstance(cfg.audio_gain, bool):
        _fail("audio_gain", f"must be true or false, got {cfg.audio_gain!r}")


def mixing(cfg: TrainConfig) -> bool:
    """Whether supervised training steps mix batches (mixup and/or CutMix)."""
    return cfg.mixup > 0 or cfg.cutmix > 0


def _validate_mixing(cfg: TrainConfig) -> None:
    numbers = {"mixup": cfg.mixup, "cutmix": cfg.cutmix, "mixup_switch_prob": cfg.mixup_switch_prob,
               "label_smoothing": cfg.label_smoothing}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, f"must be a number, got {value!r}")
    for key in ("mixup", "cutmix"):
        if getattr(cfg, key) < 0:
            _fail(key, f"must be >= 0 (a Beta(α, α) parameter; 0 = off), got {getattr(cfg, key)}")
    if not isinstance(cfg.mixup_audio, bool):
        _fail("mixup_audio", f"must be true or false, got {cfg.mixup_audio!r}")
    if not 0 <= cfg.mixup_switch_prob <= 1:
        _fail("mixup_switch_prob", f"must lie in [0, 1], got {cfg.mixup_switch_prob}")
    if not 0 <= cfg.label_smoothing < 1:
        _fail("label_smoothing", f"must lie in [0, 1), got {cfg.label_smoothing}")
    if mixing(cfg):
        key = "mixup" if cfg.mixup > 0 else "cutmix"
        if cfg.stage == "pretrain":
            _fail(key, "mixup/cutmix apply to the supervised stages (postpretrain, finetune), not pre-training")
        if cfg.regression:
            _fail(key, "mixup/cutmix need class labels; regression stages never mix (set mixup and cutmix to 0)")


def apply_overrides(section: dict, overrides: list[str]) -> dict:
    """``key=value`` (``mask.video_ratio=0.75`` for nested keys); values parse as JSON, else stay strings.

    Paths given on the command line are relative to the working directory (in the file: to the file).
    """
    section = json.loads(json.dumps(section))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if key in PATH_KEYS and isinstance(value, str):
            value = str(Path(value).resolve())
        *parents, leaf = key.split(".")
        node = section
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {name} is not an object")
        node[leaf] = value
    return section


def _ds_fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key {key}: {msg}")


def _ds_int(section: dict, key: str, name: str, minimum: int = 1, required: bool = False) -> int | None:
    if key not in section:
        if required:
            _ds_fail(name, "DeepSpeed needs it (micro-batch per GPU/process)")
        return None
    value = section[key]
    # JSON writes 5e8 as a float; DeepSpeed takes integral floats for its sizes
    integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not integral or value < minimum:
        _ds_fail(name, f"must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    return int(value)


def _ds_number(section: dict, key: str, name: str, minimum: float = 0.0) -> None:
    value = section.get(key, minimum)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        _ds_fail(name, f"must be a number >= {minimum:g}, got {value!r} ({type(value).__name__})")


def _ds_bool(section: dict, key: str, name: str) -> None:
    if key in section and not isinstance(section[key], bool):
        _ds_fail(name, f"must be true or false, got {section[key]!r} ({type(section[key]).__name__})")


def _ds_object(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        _ds_fail(key, f"must be a JSON object, got {value!r}")
    return value


DS_ZERO_SIZES = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                 "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                 "sub_group_size")
DS_ZERO_FLAGS = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
                 "round_robin_gradients", "stage3_gather_16bit_weights_on_model_save")


def validate_deepspeed(raw: dict) -> None:
    """The DeepSpeed keys the trainer relies on (types, ranges, batch arithmetic), checked before any
    process group exists; keys not listed here are left to DeepSpeed. ``WORLD_SIZE`` (set by the
    launcher in every rank) completes the batch arithmetic when present."""
    micro = _ds_int(raw, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", required=True)
    accum = _ds_int(raw, "gradient_accumulation_steps", "gradient_accumulation_steps") or 1
    total = _ds_int(raw, "train_batch_size", "train_batch_size")
    world = os.environ.get("WORLD_SIZE")
    if total is not None:
        if world is not None and world.isdigit() and total != micro * accum * int(world):
            _ds_fail("train_batch_size", f"must equal train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
                                         f"processes = {micro} x {accum} x {world} = {micro * accum * int(world)}, "
                                         f"got {total} (or leave it out: DeepSpeed derives it)")
        if total % (micro * accum):
            _ds_fail("train_batch_size", f"must be a multiple of train_micro_batch_size_per_gpu x "
                                         f"gradient_accumulation_steps = {micro * accum}, got {total}")
    _ds_number(raw, "gradient_clipping", "gradient_clipping")
    _ds_int(raw, "steps_per_print", "steps_per_print")
    _ds_bool(raw, "wall_clock_breakdown", "wall_clock_breakdown")
    for key in ("optimizer", "scheduler"):
        if key in raw:
            _ds_fail(key, "the trainer builds AdamW and the lr schedule from the avfmae section (lr, lr_batch, "
                          "min_lr, warmup_epochs, betas, weight_decay); remove DeepSpeed's section")
    enabled = []
    for key in ("fp16", "bf16"):
        section = _ds_object(raw, key)
        _ds_bool(section, "enabled", f"{key}.enabled")
        if section.get("enabled", False):
            enabled.append(key)
    if len(enabled) > 1:
        _ds_fail("fp16", "fp16 and bf16 are both enabled; enable at most one")
    fp16 = _ds_object(raw, "fp16")
    _ds_number(fp16, "loss_scale", "fp16.loss_scale")
    _ds_number(fp16, "min_loss_scale", "fp16.min_loss_scale")
    _ds_int(fp16, "initial_scale_power", "fp16.initial_scale_power", minimum=0)
    _ds_int(fp16, "loss_scale_window", "fp16.loss_scale_window")
    _ds_int(fp16, "hysteresis", "fp16.hysteresis")
    zero = _ds_object(raw, "zero_optimization")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        _ds_fail("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    for key in DS_ZERO_SIZES:
        _ds_int(zero, key, f"zero_optimization.{key}", minimum=0)
    for key in DS_ZERO_FLAGS:
        _ds_bool(zero, key, f"zero_optimization.{key}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[dict, TrainConfig]:
    """Read a training JSON: returns (DeepSpeed's keys only, validated avfmae section).

    ``overrides`` (``--set`` on the command line) change keys of the avfmae section before validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object at the top level")
    section = raw.pop("avfmae", None)
    if overrides:
        section = apply_overrides(section if isinstance(section, dict) else {}, overrides)
    cfg = parse_train_config(section, path.parent.resolve())
    validate_deepspeed(raw)
    micro = raw["train_micro_batch_size_per_gpu"]
    if mixing(cfg) and isinstance(micro, int) and micro % 2:
        raise ConfigError(f"config key train_micro_batch_size_per_gpu: mixup/cutmix pair each clip with the "
                          f"flipped batch and need an even micro-batch, got {micro}")
    base = path.parent.resolve()
    cfg = dataclasses.replace(
        cfg,
        train_manifest=cfg.resolve(cfg.train_manifest, base),
        val_manifest=cfg.resolve(cfg.val_manifest, base),
        init_checkpoint=cfg.resolve(cfg.init_checkpoint, base),
        output_dir=cfg.resolve(cfg.output_dir, base),
    )
    return raw, cfg
