"""Why and how a run stops: the signal flag, the reasons a run stops early, the error that stops a run to
protect its work, and train.py's exit codes (one per way a run ends)."""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    """train.py's exit status (README "Reliability"). A stop with a checkpoint (signal, ``stop_at_step``)
    is not 0, so a job script or scheduler can tell "resume me" from "done" (Kubernetes
    ``podFailurePolicy.onExitCodes``, a shell loop); 1 stays Python's own (an uncaught exception)."""

    COMPLETED = 0          # the schedule ran to the end: final checkpoint, model_fp32.pt exported
    CONFIG_ERROR = 2       # a bad config, found before any work or at start-up (nothing written)
    RUN_ERROR = 3          # stopped to protect the run's work (RunError: non-finite loss, lock, no usable checkpoint)
    STOPPED_AT_STEP = 4    # reached ``stop_at_step`` (a job slice): checkpoint saved, continue with --resume
    STOPPED_BY_SIGNAL = 5  # SIGTERM/SIGINT: checkpoint saved at the end of the step, continue with --resume


class StopReason(enum.Enum):
    """Why the training loop left before the end of the schedule (a checkpoint is saved either way)."""

    SIGNAL = "signal"
    STOP_AT_STEP = "stop_at_step"

    @property
    def exit_code(self) -> ExitCode:
        return {StopReason.SIGNAL: ExitCode.STOPPED_BY_SIGNAL, StopReason.STOP_AT_STEP: ExitCode.STOPPED_AT_STEP}[self]


class RunError(RuntimeError):
    """A run that cannot go on without losing work or training on garbage; the message says why and what
    to do. ``train.py`` prints it and exits with :attr:`ExitCode.RUN_ERROR`."""


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
