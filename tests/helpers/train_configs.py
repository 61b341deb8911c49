"""A minimal train.py config file for config-handling tests."""

import json
from pathlib import Path


def write_config(tmp_path: Path, ds: dict | None = None, **avfmae) -> Path:
    """``tmp_path/cfg.json``: a tiny pre-training config over an empty ``train.csv``, the DeepSpeed keys
    ``ds`` and the ``avfmae`` keys given added."""
    (tmp_path / "train.csv").write_text("video,audio,label\n")
    section = {"size": "tiny", "stage": "pretrain", "train_manifest": "train.csv", "output_dir": "out", **avfmae}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, **(ds or {}), "avfmae": section}))
    return path
