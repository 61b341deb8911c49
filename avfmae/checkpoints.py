"""DeepSpeed checkpoints that a crash mid-save cannot corrupt.

Each save goes to a new tag directory and every rank fsyncs what it wrote there; only when every rank
has finished does rank 0 write the completion marker (every file and its size) and atomically repoint
``latest`` (:func:`atomic_write`); ``--resume`` picks the newest tag complete on every rank; only tags
older than the kept complete ones are pruned, and only after the new one is durable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .stopping import RunError


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(fh)`` into a temporary file next to ``path``, fsync it, ``os.replace`` it onto ``path``,
    fsync the directory: after a crash ``path`` holds the old bytes or all the new ones (without the
    file's fsync the rename can reach the disk before the data, leaving an empty ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories bottom-up and ``directory``'s parent
    (whose entry names it)."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            try:
                fsync_path(Path(root) / name)
            except FileNotFoundError:  # another rank's temporary file, renamed since: that rank flushes it
                pass
        fsync_path(Path(root))
    fsync_path(directory.parent)


TAG_PATTERN = re.compile(r"step_(\d{8})")
_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_")


class CheckpointManager:
    """Tags ``step_00000123`` under ``directory``; a tag is *complete* when its marker
    (``complete.json``, written last, atomically, by rank 0 after every rank finished its save) lists
    every file of the tag with its size and all those files are there with those sizes.

    ``latest`` names the last complete tag for DeepSpeed's own tools (zero_to_fp32.py), written
    after the marker; ``--resume`` does not trust it: :meth:`choose` scans the tags themselves.
    """

    LATEST = "latest"
    MARKER = "complete.json"

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names when it names a complete one (garbage or a missing tag: None)."""
        path = self.directory / self.LATEST
        if not path.is_file():
            return None
        tag = path.read_bytes()[:256].decode("utf-8", errors="replace").strip()
        return tag if TAG_PATTERN.fullmatch(tag) and self.problem(tag) is None else None

    def tags(self) -> list[str]:
        """Tag directories (``step_<8 digits>``), newest first."""
        if not self.directory.is_dir():
            return []
        found = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)]
        return sorted(found, reverse=True)

    # --- completeness -------------------------------------------------------------------------------

    def problem(self, tag: str, world: int | None = None) -> str | None:
        """Why ``tag`` cannot be resumed from (None: it is complete). ``world``: the resuming run's
        number of ranks; a ZeRO-partitioned checkpoint only loads into the same number."""
        path = self.directory / tag
        marker = path / self.MARKER
        if not marker.is_file():
            return f"no completion marker {self.MARKER} (the save did not finish on every rank)"
        try:
            record = json.loads(marker.read_bytes())
            files, saved_world = dict(record["files"]), int(record["world_size"])
        except (ValueError, KeyError, TypeError) as err:
            return f"unreadable completion marker {self.MARKER} ({type(err).__name__}: {err})"
        for name, size in sorted(files.items()):
            file = path / name
            if not file.is_file():
                return f"file {name} is missing (listed by {self.MARKER})"
            if file.stat().st_size != size:
                return f"file {name} has {file.stat().st_size} bytes, {self.MARKER} recorded {size}"
        partitioned = any(_SHARD_RANK.search(name) for name in files)
        if world is not None and partitioned and saved_world != world:
            return (f"saved by {saved_world} ranks with ZeRO-partitioned states, this run has {world}: resume "
                    "with the same number of processes")
        return None

    def write_marker(self, tag: str, step: int, world: int) -> None:
        """Record every file of ``tag`` and its size, after checking each rank's ZeRO shard is there
        (rank 0, after every rank finished its save)."""
        path = self.directory / tag
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
                 if p.is_file() and p.name != self.MARKER and not p.name.startswith(".")}
        ranks = {int(m.group(1)) for name in files if (m := _SHARD_RANK.search(name))}
        if ranks and ranks != set(range(world)):
            missing = sorted(set(range(world)) - ranks)
            raise RunError(f"checkpoint {path}: no ZeRO shard of rank(s) {missing} after the save; the previous "
                           "complete checkpoint stays the one to resume from")
        record = {"tag": tag, "step": step, "world_size": world, "files": files}
        atomic_write_text(path / self.MARKER, json.dumps(record, indent=1))

    def choose(self, problems_by_rank: list[dict[str, str | None]]) -> tuple[str | None, dict[str, str]]:
        """The newest tag complete on every rank, and why each newer tag was skipped.

        ``problems_by_rank[r]`` is rank r's ``{tag: problem(tag) or None}`` (each rank checks what it
        sees, so a shard missing on one node's file system counts).
        """
        tags = sorted({t for p in problems_by_rank for t in p}, reverse=True)
        skipped = {}
        for tag in tags:
            reasons = {r: p.get(tag, "not found") for r, p in enumerate(problems_by_rank)}
            bad = {r: why for r, why in reasons.items() if why is not None}
            if not bad:
                return tag, skipped
            if len(bad) == len(reasons) and len(set(bad.values())) == 1:
                skipped[tag] = next(iter(bad.values()))  # every rank sees the same problem
            else:
                skipped[tag] = "; ".join(f"rank {r}: {why}" for r, why in bad.items())
        return None, skipped

    def set_aside(self, tag: str) -> Path:
        """Move an unusable tag out of the way (renamed, never deleted) so a resumed run cannot
        overwrite or prune it; returns the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.directory / f"{tag}.incomplete-{stamp}"
        os.replace(self.directory / tag, target)
        return target

    # --- saving -------------------------------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, *, is_rank0: bool, barrier, world: int = 1) -> str:
        tag = self.tag_for(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        # DeepSpeed writes its shards with plain torch.save (no fsync): without this, after a power loss
        # the pruning below can be on disk while the new shards are not, leaving no complete checkpoint.
        # Every rank flushes what it sees of the tag once its own save returned, so each file is flushed
        # complete at least by the rank that wrote it (on a node-local or network file system too).
        fsync_tree(self.directory / tag)
        barrier()  # every rank has written and flushed its shard before the marker and the pointer move
        if is_rank0:
            self.write_marker(tag, step, world)
            atomic_write_text(self.directory / self.LATEST, tag)
            self._prune(keep_tag=tag)  # only now: the new tag is durable, complete and named by `latest`
        barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        """Keep the ``keep`` newest complete tags up to ``keep_tag``; remove only tags older than the
        oldest of those (complete or not). Newer tags, whatever their state, are never touched."""
        older = [t for t in self.tags() if t <= keep_tag]
        complete = [t for t in older if self.problem(t) is None][: self.keep]
        if len(complete) < self.keep:
            return
        for old in older:
            if old < complete[-1]:
                shutil.rmtree(self.directory / old, ignore_errors=True)
