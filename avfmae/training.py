"""The pieces of the training loop that do not depend on DeepSpeed being initialised, one module each;
this module re-exports their public names so ``from avfmae.training import ...`` keeps working.

- :mod:`avfmae.train_config`: ``load_config`` (DeepSpeed's keys + the validated ``avfmae`` section,
  ``TrainConfig``), ``apply_overrides`` (``--set``), ``validate_deepspeed``, ``ConfigError``.
- :mod:`avfmae.schedule`: ``scaled_lrs`` / ``lr_at``, the reference's linear lr scaling, linear warm-up,
  then per-step cosine decay to the scaled floor.
- :mod:`avfmae.checkpoints`: ``CheckpointManager`` (crash-safe DeepSpeed checkpoints), ``atomic_write_text``.
- :mod:`avfmae.output_lock`: ``OutputLock``, one run per output directory (an ``fcntl`` lock, rank 0).
- :mod:`avfmae.stopping`: ``StopFlag`` (SIGTERM/SIGINT set a flag; the loop saves and leaves),
  ``StopReason``, ``ExitCode`` (train.py's exit status), ``RunError`` (a run stopped to protect its work).
- :mod:`avfmae.runlog`: ``JsonlLog``, one JSON object per line, appended and flushed (rank 0).
- :mod:`avfmae.eval_views`: ``eval_views`` / ``average_views``, multi-view evaluation.
"""

from .checkpoints import TAG_PATTERN, CheckpointManager, atomic_write_text
from .eval_views import average_views, eval_views
from .output_lock import OutputLock
from .runlog import JsonlLog
from .schedule import lr_at, scaled_lrs
from .stopping import ExitCode, RunError, StopFlag, StopReason
from .train_config import (
    COMPILE_BACKENDS,
    COMPILE_MODES,
    DS_ZERO_FLAGS,
    DS_ZERO_SIZES,
    PATH_KEYS,
    SIZES,
    STAGES,
    ConfigError,
    MaskConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    mixing,
    parse_train_config,
    validate_deepspeed,
)

__all__ = [
    "TAG_PATTERN", "CheckpointManager", "atomic_write_text", "average_views", "eval_views", "OutputLock",
    "JsonlLog", "lr_at", "scaled_lrs", "ExitCode", "RunError", "StopFlag", "StopReason",
    "COMPILE_BACKENDS",
    "COMPILE_MODES", "DS_ZERO_FLAGS", "DS_ZERO_SIZES", "PATH_KEYS", "SIZES", "STAGES", "ConfigError", "MaskConfig",
    "TrainConfig", "apply_overrides", "load_config", "mixing", "parse_train_config", "validate_deepspeed",
]
