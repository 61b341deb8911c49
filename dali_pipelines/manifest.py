"""Dataset manifests: which clips, where their video and audio live, and their labels.

Two formats are read:

* **CSV** (ours): a header ``video,audio,label``; paths relative to the manifest file (absolute paths
  are kept). ``label`` is one class index per row, or absent/empty for pre-training. Regression tasks
  use several label columns, each named ``label`` or starting with ``label_`` (``label_valence,
  label_arousal``); any other column is an error, so a typo cannot silently drop a label.
* **HiCMAE** (space-separated, no header), as HiCMAE's preprocessing scripts write them:
  ``VIDEO AUDIO LABEL [LABEL ...]``, ``VIDEO AUDIO`` (unlabelled) or ``VIDEO LABEL`` (audio in
  ``VIDEO`` with the suffix ``.wav``).

Everything is checked before training starts: every problem row is collected and reported in one
:class:`ManifestError` (the first 10 rows), rather than failing on the first one mid-epoch.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FORMATS = ("auto", "csv", "hicmae")
REQUIRED_COLUMNS = ("video", "audio")
MAX_REPORTED_ROWS = 10
UNLABELLED = -1  # the class index reported for clips of an unlabelled manifest

Task = Literal["classification", "regression", "unlabelled"]


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every offending row (the first 10)."""


@dataclass(frozen=True)
class Clip:
    """One manifest row: absolute paths and the raw label values (empty when unlabelled)."""

    video: Path
    audio: Path
    label: tuple[float, ...]
    line: int  # line number in the manifest file, for error messages


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``clips[i]`` is row ``i``; the loaders report ``index`` = i."""

    path: Path
    clips: tuple[Clip, ...]
    label_columns: tuple[str, ...]
    task: Task

    def __len__(self) -> int:
        return len(self.clips)

    def labels(self) -> np.ndarray:
        """int64 [N] class indices, float32 [N, L] regression targets, or int64 [N] of -1 (unlabelled)."""
        if self.task == "classification":
            return np.array([c.label[0] for c in self.clips], dtype=np.int64)
        if self.task == "regression":
            return np.array([c.label for c in self.clips], dtype=np.float32).reshape(len(self), -1)
        return np.full(len(self), UNLABELLED, dtype=np.int64)


def _error(path: Path, what: str, problems: Sequence[tuple[int, str]], unit: str = "line") -> ManifestError:
    shown = "\n".join(f"  {unit} {line}: {msg}" for line, msg in problems[:MAX_REPORTED_ROWS])
    more = len(problems) - MAX_REPORTED_ROWS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return ManifestError(f"manifest {path}: {what} ({len(problems)} row(s)):\n{shown}{tail}")


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / Path(value).expanduser()))  # absolute values replace base


def _parse_label(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


ENCODING = "utf-8-sig"  # a UTF-8 byte-order mark (spreadsheet exports) is dropped, not read into `video`
SEPARATORS = {"\t": "tab", ";": "semicolon", "|": "vertical bar"}


def _blank(fields: Sequence[str]) -> bool:
    """A row with no text in any field (an empty line, or a spreadsheet export's ``,,``)."""
    return not any(x.strip() for x in fields)


def _first_line(path: Path) -> str:
    with path.open(newline="", encoding=ENCODING) as f:
        for line in f:
            if not _blank(line.split(",")):
                return line.strip()
    return ""


def _sniff_format(path: Path) -> str:
    """"csv" when the first line is a header with a ``video`` column, "hicmae" for space-separated rows;
    a header in another layout is an error that says what is wrong with it."""
    first = _first_line(path)
    fields = [c.strip().lower() for c in first.split(",")]
    if "video" in fields:
        return "csv"
    for sep, name in SEPARATORS.items():
        if "video" in [c.strip().lower() for c in first.split(sep)]:
            raise ManifestError(f"manifest {path}: the header {first!r} is {name}-separated; CSV manifests use "
                                "commas: `video,audio,label`")
    if "video" in first.lower().split():
        raise ManifestError(f"manifest {path}: the header {first!r} is space-separated; CSV manifests use commas: "
                            "`video,audio,label` (HiCMAE-style space-separated lists have no header)")
    if "," in first and len(first.split()) < 2:  # comma-separated, not HiCMAE's space-separated rows
        if len(fields) >= 2 and all("." in f or "/" in f for f in fields[:2]):
            raise ManifestError(f"manifest {path}: the first line {first!r} is a row, not a header; a CSV "
                                "manifest starts with the header `video,audio,label`")
        raise ManifestError(f"manifest {path}: bad header {first!r}: no `video` column. Expected `video,audio` "
                            "followed by optional label columns named `label` or `label_*`")
    return "hicmae"


def _read_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], tuple[str, ...]]:
    with path.open(newline="", encoding=ENCODING) as f:
        reader = csv.reader(f)
        # blank lines before the header are skipped, as _sniff_format skips them
        header = next((fields for fields in reader if not _blank(fields)), None)
        if header is None:
            raise ManifestError(f"manifest {path} is empty: expected a header `video,audio,label` and rows")
        columns = [c.strip() for c in header]
        _check_header(path, columns)
        rows, bad = [], []
        for fields in reader:
            if not any(x.strip() for x in fields):
                continue  # blank line
            if len(fields) != len(columns):
                bad.append((reader.line_num, f"expected {len(columns)} fields ({','.join(columns)}), "
                                             f"got {len(fields)}"))
                continue
            rows.append((reader.line_num, {c: x.strip() for c, x in zip(columns, fields, strict=True)}))
    if bad:
        raise _error(path, "rows with the wrong number of fields", bad)
    return rows, tuple(c for c in columns if c not in REQUIRED_COLUMNS)


def is_label_column(name: str) -> bool:
    return name == "label" or name.startswith("label_")


def _check_header(path: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS and not is_label_column(c)]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown column(s) {', '.join(repr(c) for c in unknown)}")
    if duplicated:
        problems.append(f"duplicated column(s) {', '.join(duplicated)}")
    if problems:
        raise ManifestError(
            f"manifest {path}: bad header {','.join(columns)}: {'; '.join(problems)}. Expected `video,audio` "
            "followed by optional label columns named `label` or `label_*` (several for regression)"
        )


def _read_hicmae(path: Path) -> tuple[list[tuple[int, dict[str, str]]], tuple[str, ...]]:
    rows = []
    with path.open(encoding=ENCODING) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 1:
                raise _error(path, "HiCMAE-style rows need `VIDEO AUDIO [LABEL ...]` or `VIDEO LABEL`",
                             [(line_no, f"one field only: {line.strip()!r}")])
            if len(fields) == 2 and _parse_label(fields[1]) is not None:
                fields = [fields[0], str(Path(fields[0]).with_suffix(".wav")), fields[1]]
            row = {"video": fields[0], "audio": fields[1]}
            row.update({f"label_{i}" if i else "label": x for i, x in enumerate(fields[2:])})
            rows.append((line_no, row))
    n_labels = _hicmae_label_count(path, rows)
    return rows, tuple(f"label_{i}" if i else "label" for i in range(n_labels))


def _hicmae_label_count(path: Path, rows: list[tuple[int, dict[str, str]]]) -> int:
    """The number of labels every row must have. With no header to say it, the most common row width
    decides (the first row's on a tie), so the error names the few odd rows rather than the many good ones."""
    widths = Counter(len(row) for _, row in rows)
    if not widths:
        return 0
    usual = widths.most_common(1)[0][0]
    problems = [(line, f"{len(row)} fields, expected {usual}") for line, row in rows if len(row) != usual]
    if problems:
        raise _error(path, f"rows with different numbers of fields than most rows ({usual}: VIDEO AUDIO and "
                           f"{usual - 2} label(s))", problems)
    return usual - 2


def _labels(path: Path, rows: list[tuple[int, dict[str, str]]], columns: tuple[str, ...]):
    """Parse label columns; returns ({line: values}, task)."""
    texts = {line: [row[c] for c in columns] for line, row in rows}
    filled = {line: all(t != "" for t in values) for line, values in texts.items()}
    if not columns or not any(any(t != "" for t in v) for v in texts.values()):
        return {line: () for line in texts}, "unlabelled"
    problems = []
    for line, v in texts.items():
        if not filled[line]:
            empty = ", ".join(c for c, t in zip(columns, v, strict=True) if not t)
            problems.append((line, f"label missing in column(s) {empty} while other rows are labelled"))
    values = {}
    for line, v in texts.items():
        parsed = [_parse_label(t) for t in v]
        if filled[line] and any(p is None for p in parsed):
            bad = ", ".join(repr(t) for t, p in zip(v, parsed, strict=True) if p is None)
            problems.append((line, f"unparsable label(s) {bad} (expected numbers: a class index or "
                                   "regression targets)"))
        values[line] = tuple(p for p in parsed if p is not None)
    if problems:
        raise _error(path, "bad labels", sorted(problems))
    integral = all(float(x).is_integer() and x >= 0 for v in values.values() for x in v)
    task = "classification" if len(columns) == 1 and integral else "regression"
    return values, task


def _check_task(path: Path, clips: Sequence[Clip], columns: tuple[str, ...], found: Task, task: Task,
                num_outputs: int | None) -> None:
    """Labels against the task the config states (not the one the values suggest), naming each row."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if found == "unlabelled":
        raise ManifestError(f"manifest {path}: no labels, but the config's task is {task} (add a `label` column)")
    problems = []
    if task == "classification":
        if len(columns) != 1:
            raise ManifestError(f"manifest {path}: {len(columns)} label columns {list(columns)}, but the config's "
                                "task is classification (one `label` column of class indices; for regression set "
                                "`regression: true`)")
        limit = f"[0, num_outputs={num_outputs})" if num_outputs else ">= 0"
        for clip in clips:
            value = clip.label[0]
            if not (value.is_integer() and value >= 0 and (not num_outputs or value < num_outputs)):
                problems.append((clip.line, f"label {value:g} is not a class index {limit}"))
    elif num_outputs and len(columns) != num_outputs:
        raise ManifestError(f"manifest {path}: {len(columns)} label column(s) {list(columns)}, but the config's "
                            f"regression task has num_outputs={num_outputs} targets")
    if problems:
        raise _error(path, f"labels that do not fit the config ({task}, num_outputs={num_outputs})", problems)


def _check_files(path: Path, clips: Iterable[Clip]) -> None:
    problems = []
    for clip in clips:
        for kind, p in (("video", clip.video), ("audio", clip.audio)):
            if p.is_dir():
                problems.append((clip.line, f"{kind} path is a directory (frame folders are not read; encode "
                                            f"the frames into a VP9/H.264 video file): {p}"))
            elif not p.is_file():
                problems.append((clip.line, f"{kind} file not found: {p}"))
    if problems:
        raise _error(path, "missing files", problems)


def read_manifest(path: str | Path, fmt: str = "auto", check_files: bool = True, task: Task | None = None,
                  num_outputs: int | None = None) -> Manifest:
    """Read and validate a manifest (see the module docstring for the formats).

    Args:
        path: the manifest file; relative clip paths are resolved against its folder.
        fmt: "csv", "hicmae" or "auto" (CSV when the first line has a ``video`` column).
        check_files: verify that every video and audio file exists.
        task: the task the training config states, "classification" or "regression"; None infers it
            from the values (one column of non-negative integers: classification). Given, every row
            must fit it, and ``num_outputs`` (when given) bounds the class indices / is the number of
            regression targets.

    Returns:
        The :class:`Manifest`, rows in file order.

    Raises:
        ManifestError (a ValueError): empty manifest, bad header (missing/unknown/duplicated columns),
            rows with the wrong number of fields, unparsable or partly missing labels, missing files —
            each listing the offending lines (the first 10).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    if not path.read_text(encoding=ENCODING, errors="replace").strip():
        raise ManifestError(f"manifest {path} is empty: expected a header `video,audio,label` and rows")
    if fmt == "auto":
        fmt = _sniff_format(path)
    rows, label_columns = _read_csv(path) if fmt == "csv" else _read_hicmae(path)
    if not rows:
        raise ManifestError(f"manifest {path} has no clips")
    labels, found = _labels(path, rows, label_columns)
    base = path.parent.resolve()
    clips = tuple(Clip(_resolve(base, row["video"]), _resolve(base, row["audio"]), labels[line], line)
                  for line, row in rows)
    if task is not None:
        _check_task(path, clips, label_columns, found, task, num_outputs)
    task = task or found
    if check_files:
        _check_files(path, clips)
    return Manifest(path.resolve(), clips, label_columns if task != "unlabelled" else (), task)


def write_manifest(
    path: str | Path, rows: Iterable[tuple[str | Path, str | Path, Sequence[float] | float | None]],
    label_columns: Sequence[str] = ("label",),
) -> Path:
    """Write a CSV manifest; paths inside ``path``'s folder are stored relative to it.

    ``rows`` yields ``(video, audio, label)``; ``label`` is a number (Python or numpy), a sequence
    matching ``label_columns``, or None for an unlabelled manifest (then no label column is written).

    Raises:
        ManifestError (a ValueError), before anything is written: bad ``label_columns``, or rows of a
            labelled manifest whose label count differs from ``len(label_columns)`` (None included), or
            labels that are not finite numbers, each named by its row index (the first 10).
    """
    path = Path(path)
    base = path.parent.resolve()
    rows = list(rows)
    labelled = any(r[2] is not None for r in rows)
    columns = tuple(label_columns) if labelled else ()
    if labelled:
        _check_header(path, ["video", "audio", *columns])  # what read_manifest would reject
    labels = _format_labels(path, [r[2] for r in rows], columns)

    def rel(p: str | Path) -> str:
        p = Path(p).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    lines = [[rel(video), rel(audio), *text] for (video, audio, _), text in zip(rows, labels, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "audio", *columns])
        writer.writerows(lines)
    return path


def _label_values(label) -> list | None:
    """A row's label as a list of values ([] for None); None when it is not finite numbers."""
    if label is None:
        values = []
    elif isinstance(label, numbers.Number | str | bytes) or not isinstance(label, Iterable):
        values = [label]  # one value, numpy's numbers included; a string is refused, not split into characters
    else:
        values = list(label)
    return values if all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values) else None


def _format_labels(path: Path, labels: list, columns: tuple[str, ...]) -> list[list[str]]:
    """Each row's label as the CSV fields under ``columns``. Every mismatch is reported at once and none
    is written: read_manifest would reject a short or long row, or read a value under the wrong column."""
    values = [_label_values(label) for label in labels]
    problems = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        if v is None:
            problems.append((i, f"label {label!r} is not a finite number or a sequence of finite numbers"))
        elif len(v) != len(columns):
            given = "no label (None)" if label is None else f"{len(v)} label value(s) {label!r}"
            problems.append((i, f"{given}, expected {len(columns)}: one per label column ({', '.join(columns)})"))
    if problems:
        raise _error(path, "nothing written, rows with bad labels", problems, unit="row")
    return [[str(int(x)) if float(x).is_integer() else repr(float(x)) for x in v] for v in values]
