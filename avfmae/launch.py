"""``python -m avfmae.launch ARGS``: DeepSpeed's ``deepspeed ARGS``, with SIGTERM/SIGINT reaching every rank.

DeepSpeed's runner (the ``deepspeed`` command) installs no signal handler on a single node: a SIGTERM
to it ends the runner alone while its ``deepspeed.launcher.launch`` child and the ranks train on. And
``launch`` itself, when signalled, terminates the ranks and kills them 30 s later, whether or not their
checkpoint is written. This wrapper runs the runner in its own session and hands a SIGTERM or SIGINT
straight to the ranks (the children of ``deepspeed.launcher.launch``), whose handler
(``avfmae.stopping.StopFlag``) saves a checkpoint at the end of the step and exits 5
(``ExitCode.STOPPED_BY_SIGNAL``); the launcher then ends with that status (every rank has saved by
then). A second signal goes to the whole process group (the launcher's own teardown). Where no local
rank is found (multi-node runs through pdsh, whose runner forwards signals itself) the signal goes to
the runner. Exit status: the runner's.

    python -m avfmae.launch --num_gpus 8 train.py --config ds_configs/huge.json
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

LAUNCH_MODULE = "deepspeed.launcher.launch"


def deepspeed_command() -> str:
    """The ``deepspeed`` script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("deepspeed")
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if found is None:
        raise SystemExit("avfmae.launch: no `deepspeed` command found (install the `train` extra)")
    return found


def local_ranks(runner_pid: int) -> list[psutil.Process]:
    """The training processes under ``runner_pid``: the children of ``deepspeed.launcher.launch``."""
    try:
        tree = psutil.Process(runner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for proc in tree:
        try:
            if any(LAUNCH_MODULE in part for part in proc.parent().cmdline()):
                ranks.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return ranks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runner = subprocess.Popen([deepspeed_command(), *argv], start_new_session=True)
    received = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        ranks = local_ranks(runner.pid)
        if len(received) > 1:
            os.killpg(runner.pid, signum)
        elif ranks:
            for proc in ranks:
                try:
                    proc.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass
        else:
            runner.send_signal(signum)
        name = signal.Signals(signum).name
        target = "the process group" if len(received) > 1 else f"{len(ranks)} rank(s)" if ranks else "the runner"
        print(f"avfmae.launch: {name} passed to {target}", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = runner.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
