"""Pieces of the training loop that do not depend on DeepSpeed being initialised.

- ``load_config``: one JSON = DeepSpeed's keys + an ``avfmae`` section; the section is validated into a
  frozen ``TrainConfig`` before any process group does work, and only DeepSpeed's keys go on.
- ``lr_at``: linear warm-up then per-step cosine decay to ``min_lr`` (the reference recipes).
- ``CheckpointManager``: DeepSpeed checkpoints that a crash mid-save cannot corrupt — each save goes
  to a new tag directory, and only when every rank has finished does rank 0 atomically repoint
  ``latest`` (write a temporary file, fsync, ``os.replace``); older tags are pruned afterwards.
- ``StopFlag``: SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly.
- ``JsonlLog``: one JSON object per line, appended and flushed (rank 0).
- ``eval_views`` / ``average_views``: multi-view evaluation (``test_clips`` x ``test_crops``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float | None = None     # fine-tuning: lr * layer_decay ** (depth - layer_id)
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0                   # mixup Beta(α, α) of the supervised stages; 0 = off
    cutmix: float = 0.0                  # CutMix Beta(α, α); 0 = off
    mixup_switch_prob: float = 0.5       # chance of CutMix instead of mixup when both are on
    mixup_audio: bool = True             # mix the audio with the same pairs and λ (reference code: video only)
    activation_checkpointing: bool = False
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

    def resolve(self, path: str | None, base: Path) -> str | None:
        if path is None:
            return None
        p = Path(path)
        return str(p if p.is_absolute() else (base / p))


DS_REQUIRED = ("train_micro_batch_size_per_gpu",)


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
        if not (isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            _fail("betas", f"expected two numbers in [0, 1), got {betas!r}")
        values["betas"] = tuple(betas)
    try:
        cfg = TrainConfig(**values, mask=MaskConfig(**mask))
    except TypeError as err:
        raise ConfigError(f"avfmae section: {err}") from err
    _validate(cfg, base)
    return cfg


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
                "eval_every_epochs": cfg.eval_every_epochs}
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
    if not 0 <= cfg.drop_path < 1:
        _fail("drop_path", f"must lie in [0, 1), got {cfg.drop_path}")
    _validate_mixing(cfg)
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


def eval_views(cfg: TrainConfig) -> list[tuple[int, int, int, int] | None]:
    """The evaluation views, (clip_index, num_clips, crop_index, num_crops) for every (clip, crop) pair;
    ``[None]`` (the loader's default centred window and centre crop) for 1 x 1."""
    if (cfg.test_clips, cfg.test_crops) == (1, 1):
        return [None]
    return [(c, cfg.test_clips, k, cfg.test_crops) for c in range(cfg.test_clips) for k in range(cfg.test_crops)]


def average_views(outputs: list[Any], regression: bool) -> Any:
    """One prediction per clip from its views' outputs (each [N, ...] in the same clip order).

    Classification: the mean of the per-view softmax probabilities (VideoMAE/HiCMAE's test merge);
    regression: the mean of the outputs. A single view comes back unchanged (logits), which leaves
    arg-max metrics as they were without views.
    """
    import torch

    if not outputs:
        raise ValueError("outputs must hold at least one view")
    if len({tuple(o.shape) for o in outputs}) != 1:
        raise ValueError(f"outputs: every view must give the same shape, got {[tuple(o.shape) for o in outputs]}")
    if len(outputs) == 1:
        return outputs[0]
    stacked = torch.stack([o.float() for o in outputs])
    return stacked.mean(0) if regression else stacked.softmax(-1).mean(0)


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
    for key in DS_REQUIRED:
        if key not in raw:
            raise ConfigError(f"config key {key}: DeepSpeed needs it (micro-batch per GPU/process)")
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


# --- learning rate ----------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, minimum: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``minimum`` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


# --- checkpoints ------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointManager:
    """Tags ``step_00000123`` under ``directory``; ``latest`` names the last complete one.

    ``latest`` is the file DeepSpeed's own tools (zero_to_fp32.py) read, so we write it ourselves,
    atomically, only after the save completed on every rank (DeepSpeed's save_latest is turned off).
    """

    LATEST = "latest"

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def latest_tag(self) -> str | None:
        path = self.directory / self.LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if (self.directory / tag).is_dir() else None

    def save(self, engine, step: int, client_state: dict, *, is_rank0: bool, barrier) -> str:
        tag = self.tag_for(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        barrier()  # every rank has written its shard before the pointer moves
        if is_rank0:
            atomic_write_text(self.directory / self.LATEST, tag)
            self._prune(keep_tag=tag)
        barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.directory / old, ignore_errors=True)


# --- signals and logs -------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and leave instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class JsonlLog:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
