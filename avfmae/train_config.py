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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dali_pipelines.spec import BAD_CLIP_POLICIES, DEVICES, VIDEO_DECODERS  # light: no DALI import

from .config import CONFIGS, FUSIONS, LGI_LAYERS, ModelConfig, get_config

STAGES = ("pretrain", "postpretrain", "finetune")
PATH_KEYS = ("train_manifest", "val_manifest", "init_checkpoint", "output_dir")
SIZES = tuple(CONFIGS)  # the model registry owns the size names
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@dataclass(frozen=True)
class MaskConfig:
    """The config's ``mask`` section; its defaults are ModelConfig's (their one owner)."""

    video_ratio: float = _MODEL_DEFAULTS["video_mask_ratio"]
    audio_ratio: float = _MODEL_DEFAULTS["audio_mask_ratio"]
    video_decoder_ratio: float = _MODEL_DEFAULTS["video_decoder_mask_ratio"]
    audio_decoder_ratio: float = _MODEL_DEFAULTS["audio_decoder_mask_ratio"]


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


@dataclass(frozen=True)
class Rule:
    """One check of the avfmae section: unless ``ok(cfg)``, a ConfigError ``avfmae.<key>: <why(cfg)>``.
    ``key`` is a string or, where the offending key depends on the values, a function of the config."""

    key: str | Callable[[TrainConfig], str]
    ok: Callable[[TrainConfig], bool]
    why: Callable[[TrainConfig], str]

    def check(self, cfg: TrainConfig) -> None:
        if not self.ok(cfg):
            _fail(self.key if isinstance(self.key, str) else self.key(cfg), self.why(cfg))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(key: str, choices: tuple) -> Rule:
    return Rule(key, lambda c: getattr(c, key) in choices,
                lambda c: f"expected one of {choices}, got {getattr(c, key)!r}")


def _positive(key: str) -> Rule:
    return Rule(key, lambda c: isinstance(getattr(c, key), (int, float)) and getattr(c, key) > 0,
                lambda c: f"must be a positive number, got {getattr(c, key)!r}")


def _positive_int(key: str) -> Rule:
    value = lambda c: getattr(c, key)  # noqa: E731
    return Rule(key, lambda c: _number(value(c)) and isinstance(value(c), int) and value(c) >= 1,
                lambda c: f"must be a positive integer, got {value(c)!r}")


def _step_or_null(key: str) -> Rule:
    value = lambda c: getattr(c, key)  # noqa: E731
    return Rule(key, lambda c: value(c) is None or (isinstance(value(c), int) and value(c) >= 1),
                lambda c: f"must be an integer >= 1 or null, got {value(c)!r}")


def _flag(key: str) -> Rule:
    return Rule(key, lambda c: isinstance(getattr(c, key), bool),
                lambda c: f"must be true or false, got {getattr(c, key)!r}")


def _within(key: str, interval: str, inside: Callable[[float], bool], optional: bool = False) -> Rule:
    """``key`` in ``interval`` (written as the message gives it, e.g. "[0, 1)"); None passes if ``optional``."""
    value = lambda c: getattr(c, key)  # noqa: E731
    return Rule(key, lambda c: (optional and value(c) is None) or inside(value(c)),
                lambda c: f"must lie in {interval}, got {value(c)}")


def _mixing_key(cfg: TrainConfig) -> str:
    return "mixup" if cfg.mixup > 0 else "cutmix"


def _rand_augment_problem(cfg: TrainConfig) -> str | None:
    if cfg.rand_augment is None:
        return None
    from dali_pipelines.augment import RandAugmentSpec

    try:
        RandAugmentSpec.parse(cfg.rand_augment)
    except ValueError as err:
        return str(err).removeprefix("rand_augment: ")
    return None


def _file_rules(base: Path) -> tuple[Rule, ...]:
    """The files a config names exist (relative paths from the config file's directory ``base``)."""
    def path(c: TrainConfig, key: str) -> str | None:
        return c.resolve(getattr(c, key), base)

    return tuple(Rule(key, lambda c, k=key: path(c, k) is None or Path(path(c, k)).is_file(),
                      lambda c, k=key: f"file not found: {path(c, k)}"
                      + (" (a directory)" if Path(path(c, k)).is_dir() else ""))
                 for key in ("train_manifest", "val_manifest", "init_checkpoint"))


# what the run is: checked before the files it names
_STAGE_RULES = (
    _one_of("size", SIZES),
    _one_of("stage", STAGES),
    Rule("num_outputs", lambda c: c.stage == "pretrain" or c.num_outputs >= 1,
         lambda c: f"stage {c.stage!r} needs the number of classes/targets (>= 1)"),
    Rule("video_only", lambda c: not (c.stage == "pretrain" and c.video_only),
         lambda c: "pre-training is audio-visual; video_only applies to fine-tuning"),
    Rule("train_manifest", lambda c: c.train_manifest is not None, lambda c: "is required"),
)

# every other key, in the order the checks report them
_VALUE_RULES = (
    *(_positive(key) for key in ("epochs", "lr", "lr_batch", "checkpoint_every_steps", "keep_checkpoints",
                                 "log_every_steps", "data_threads", "eval_every_epochs", "max_nonfinite_steps")),
    _positive_int("test_clips"),
    _positive_int("test_crops"),
    _step_or_null("max_steps"),
    _step_or_null("stop_at_step"),
    Rule("min_lr", lambda c: 0 <= c.min_lr <= c.lr, lambda c: f"must lie in [0, lr={c.lr}], got {c.min_lr}"),
    Rule("warmup_epochs", lambda c: 0 <= c.warmup_epochs < c.epochs,
         lambda c: f"must lie in [0, epochs={c.epochs}), got {c.warmup_epochs}"),
    _within("layer_decay", "(0, 1]", lambda v: 0 < v <= 1, optional=True),
    _within("drop_path", "[0, 1)", lambda v: 0 <= v < 1, optional=True),
    # mixup / CutMix (the supervised stages)
    *(Rule(key, lambda c, k=key: _number(getattr(c, k)) and math.isfinite(getattr(c, k)),
           lambda c, k=key: f"must be a number, got {getattr(c, k)!r}")
      for key in ("mixup", "cutmix", "mixup_switch_prob", "label_smoothing")),
    *(Rule(key, lambda c, k=key: getattr(c, k) >= 0,
           lambda c, k=key: f"must be >= 0 (a Beta(α, α) parameter; 0 = off), got {getattr(c, k)}")
      for key in ("mixup", "cutmix")),
    _flag("mixup_audio"),
    _within("mixup_switch_prob", "[0, 1]", lambda v: 0 <= v <= 1),
    _within("label_smoothing", "[0, 1)", lambda v: 0 <= v < 1),
    Rule(_mixing_key, lambda c: not (mixing(c) and c.stage == "pretrain"),
         lambda c: "mixup/cutmix apply to the supervised stages (postpretrain, finetune), not pre-training"),
    Rule(_mixing_key, lambda c: not (mixing(c) and c.regression),
         lambda c: "mixup/cutmix need class labels; regression stages never mix (set mixup and cutmix to 0)"),
    # compilation and data
    _one_of("compile", COMPILE_MODES),
    _one_of("compile_backend", COMPILE_BACKENDS),
    _one_of("bad_clips", BAD_CLIP_POLICIES),
    _within("max_bad_clip_fraction", "[0, 1]", lambda v: 0 <= v <= 1),  # as LoaderOptions takes it
    # augmentations
    Rule("rand_augment", lambda c: _rand_augment_problem(c) is None, _rand_augment_problem),
    Rule("random_erase", lambda c: _number(c.random_erase) and 0 <= c.random_erase <= 1,
         lambda c: f"must be a probability in [0, 1], got {c.random_erase!r}"),
    _positive_int("random_erase_count"),
    Rule("random_erase_mode", lambda c: c.random_erase_mode == "pixel",
         lambda c: f"only 'pixel' (per-pixel normal noise, the reference's) is implemented, "
                   f"got {c.random_erase_mode!r}"),
    _flag("audio_gain"),
    # model variants and targets
    _one_of("fusion", FUSIONS),
    _one_of("lgi", LGI_LAYERS),
    _flag("frame_diff_target"),
    Rule("frame_diff_target", lambda c: not (c.frame_diff_target and c.stage != "pretrain"),
         lambda c: "is a pre-training reconstruction target; the supervised stages have none"),
    # where the data is decoded
    _one_of("data_device", ("auto", *DEVICES)),
    _one_of("data_video_decoder", VIDEO_DECODERS),
    Rule("data_video_decoder", lambda c: not (c.data_video_decoder == "torchcodec" and c.data_device == "gpu"),
         lambda c: "'torchcodec' decodes on the CPU (data_device 'cpu'); on the GPU DALI decodes with NVDEC"),
    *(Rule(f"mask.{f.name}", lambda c, n=f.name: 0 < getattr(c.mask, n) < 1,
           lambda c, n=f.name: f"must lie in (0, 1), got {getattr(c.mask, n)}")
      for f in dataclasses.fields(MaskConfig)),
    # last: the model these keys describe can be built (ModelConfig's own rules, e.g. whole patches and
    # whole kept counts); before, such values passed here and failed after process-group init
    Rule(lambda c: _model_problem(c)[0], lambda c: _model_problem(c) is None,
         lambda c: f"the {c.size} model refuses it: {_model_problem(c)[1]}"),
)


# config key -> ModelConfig field, of the keys that are model settings (drop-path, geometry, ablation
# variants; masks and targets in pre-training only); model_arguments and the config check read this table
_MODEL_KEYS = (("activation_checkpointing", "checkpoint_activations"), ("fusion", "fusion"), ("lgi", "lgi"),
               ("drop_path", "drop_path"), ("num_frames", "num_frames"), ("image_size", "image_size"),
               ("audio_frames", "audio_frames"))
_PRETRAIN_MODEL_KEYS = (("mask.video_ratio", "video_mask_ratio"), ("mask.audio_ratio", "audio_mask_ratio"),
                        ("mask.video_decoder_ratio", "video_decoder_mask_ratio"),
                        ("mask.audio_decoder_ratio", "audio_decoder_mask_ratio"),
                        ("frame_diff_target", "frame_diff_target"))


def model_settings(cfg: TrainConfig) -> dict[str, tuple[str, Any]]:
    """config key -> (ModelConfig field, value) of the model settings ``cfg`` gives; a None value is left
    out (``drop_path`` None: build_model's task-dependent default, its one owner; geometry None: the
    model config's)."""
    keys = _MODEL_KEYS + (_PRETRAIN_MODEL_KEYS if cfg.stage == "pretrain" else ())
    settings = {}
    for key, name in keys:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None:
            settings[key] = (name, value)
    return settings


def model_arguments(cfg: TrainConfig) -> tuple[str, dict]:
    """(task, keyword arguments) of ``avfmae.build_model`` for a training config: the recipe keys that
    are model settings (drop-path, masks, targets, geometry, ablation variants) reach the model here."""
    overrides = dict(model_settings(cfg).values())
    if cfg.stage == "pretrain":
        return "pretrain", overrides
    return "finetune", dict(num_outputs=cfg.num_outputs, regression=cfg.regression, video_only=cfg.video_only,
                            label_smoothing=cfg.label_smoothing, **overrides)


def _model_problem(cfg: TrainConfig) -> tuple[str, str] | None:
    """(config key, the model config's reason) when the model ``cfg`` describes cannot be built. The keys
    are applied to the size's config one at a time, so the one named is the first that breaks it."""
    applied = {}
    for key, (name, value) in model_settings(cfg).items():
        applied[name] = value
        try:
            get_config(cfg.size, **applied)
        except ValueError as err:
            return key, str(err)
    return None


def _validate(cfg: TrainConfig, base: Path) -> None:
    """The section's rules in order (the first that fails raises): what the run is, the files it names,
    then every value and the rules between values."""
    for rule in (*_STAGE_RULES, *_file_rules(base), *_VALUE_RULES):
        rule.check(cfg)


def mixing(cfg: TrainConfig) -> bool:
    """Whether supervised training steps mix batches (mixup and/or CutMix)."""
    return cfg.mixup > 0 or cfg.cutmix > 0


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


def _ds_int(section: dict, key: str, name: str, minimum: int = 1, required: bool = False,
            whole_floats: bool = True) -> int | None:
    if key not in section:
        if required:
            _ds_fail(name, "DeepSpeed needs it (micro-batch per GPU/process)")
        return None
    value = section[key]
    # JSON writes 5e8 as a float; DeepSpeed takes integral floats for its sizes (not for batch counts,
    # which the trainer and the sampler use as ints: whole_floats=False)
    integral = isinstance(value, int) or (whole_floats and isinstance(value, float) and math.isfinite(value)
                                          and value.is_integer())
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


# (key, kind, minimum) of the scalar DeepSpeed keys the trainer relies on, per section, in checking order
_DS_TOP_KEYS = (("gradient_clipping", "number", 0.0), ("steps_per_print", "int", 1),
                ("wall_clock_breakdown", "bool", None))
_DS_FP16_KEYS = (("loss_scale", "number", 0.0), ("min_loss_scale", "number", 0.0), ("initial_scale_power", "int", 0),
                 ("loss_scale_window", "int", 1), ("hysteresis", "int", 1))
_DS_ZERO_KEYS = (*((key, "int", 0) for key in DS_ZERO_SIZES), *((key, "bool", None) for key in DS_ZERO_FLAGS))


def _ds_keys(section: dict, prefix: str, table: tuple) -> None:
    for key, kind, minimum in table:
        name = prefix + key
        if kind == "int":
            _ds_int(section, key, name, minimum=minimum)
        elif kind == "number":
            _ds_number(section, key, name, minimum=minimum)
        else:
            _ds_bool(section, key, name)


def _ds_batch(raw: dict) -> None:
    """micro x accumulation x processes = train_batch_size when it is given (processes: ``WORLD_SIZE``)."""
    micro = _ds_int(raw, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", required=True,
                    whole_floats=False)
    accum = _ds_int(raw, "gradient_accumulation_steps", "gradient_accumulation_steps", whole_floats=False) or 1
    total = _ds_int(raw, "train_batch_size", "train_batch_size", whole_floats=False)
    world = os.environ.get("WORLD_SIZE")
    if total is None:
        return
    if world is not None and world.isdigit() and total != micro * accum * int(world):
        _ds_fail("train_batch_size", f"must equal train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
                                     f"processes = {micro} x {accum} x {world} = {micro * accum * int(world)}, "
                                     f"got {total} (or leave it out: DeepSpeed derives it)")
    if total % (micro * accum):
        _ds_fail("train_batch_size", f"must be a multiple of train_micro_batch_size_per_gpu x "
                                     f"gradient_accumulation_steps = {micro * accum}, got {total}")


def _ds_precision(raw: dict) -> None:
    """At most one of fp16/bf16 enabled; fp16's loss-scaling keys."""
    enabled = []
    for key in ("fp16", "bf16"):
        section = _ds_object(raw, key)
        _ds_bool(section, "enabled", f"{key}.enabled")
        if section.get("enabled", False):
            enabled.append(key)
    if len(enabled) > 1:
        _ds_fail("fp16", "fp16 and bf16 are both enabled; enable at most one")
    _ds_keys(_ds_object(raw, "fp16"), "fp16.", _DS_FP16_KEYS)


def _ds_zero(raw: dict) -> None:
    zero = _ds_object(raw, "zero_optimization")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        _ds_fail("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    _ds_keys(zero, "zero_optimization.", _DS_ZERO_KEYS)


def validate_deepspeed(raw: dict) -> None:
    """The DeepSpeed keys the trainer relies on (types, ranges, batch arithmetic), checked before any
    process group exists; keys not listed here are left to DeepSpeed. ``WORLD_SIZE`` (set by the
    launcher in every rank) completes the batch arithmetic when present."""
    _ds_batch(raw)
    _ds_keys(raw, "", _DS_TOP_KEYS)
    for key in ("optimizer", "scheduler"):
        if key in raw:
            _ds_fail(key, "the trainer builds AdamW and the lr schedule from the avfmae section (lr, lr_batch, "
                          "min_lr, warmup_epochs, betas, weight_decay); remove DeepSpeed's section")
    _ds_precision(raw)
    _ds_zero(raw)


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
    if mixing(cfg) and micro % 2:
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
