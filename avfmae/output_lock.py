"""One run per output directory: an ``fcntl`` lock held by rank 0."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .stopping import RunError


class OutputLock:
    """An exclusive POSIX lock (``fcntl.lockf``, which NFS honours too) on ``<output_dir>/train.lock``,
    held by rank 0 for the whole run and released by the kernel when the process ends, however it
    ends. The file records the holder (host, pid, start time, command) for the message a second run
    gets; a recorded holder that is gone from this host means a stale lock left by a file system that
    kept it (NFS lock daemon), and the message says so."""

    FILE = "train.lock"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"output_dir {self.path.parent} is in use by another run ({self.holder()}); two runs "
                           f"writing one output_dir would overwrite each other's checkpoints. Wait for it, stop "
                           f"it, or choose another output_dir") from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, from the record in the file. Only for a process that does not hold the
        lock: closing the descriptor this opens would drop a POSIX lock held by the same process."""
        import socket

        try:
            record = json.loads(self.path.read_bytes())
            host, pid = str(record["host"]), int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"lock file {self.path}, holder unknown"
        said = f"pid {pid} on host {host} since {record.get('started', '?')}: {record.get('command', '?')}"
        if host == socket.gethostname() and not _pid_alive(pid):
            return (f"stale lock: the recorded holder, {said}, is gone, yet the lock is still held (a network "
                    f"file system's lock daemon?); if no run uses this directory, delete {self.path}")
        return f"held by {said}; lock file {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
