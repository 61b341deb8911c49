"""The run's JSONL log: one JSON object per line, appended and flushed (rank 0)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _strict_json(value: Any) -> Any:
    """NaN/inf as the strings "nan"/"inf"/"-inf" (strict JSON has no such numbers), in nested dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


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
            fh.write(json.dumps(_strict_json(record)) + "\n")
            fh.flush()
