"""Why and how a run stops: the signal flag, the error that stops a run to protect its work, exit codes."""

from __future__ import annotations

import signal


class RunError(RuntimeError):
    """A run that cannot go on without losing work or training on garbage; the message says why and what
    to do. ``train.py`` prints it and exits with :data:`RUN_ERROR_EXIT`."""


RUN_ERROR_EXIT = 3


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
