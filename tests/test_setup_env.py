"""Installing an extra never swaps out torch (issue 16): scripts/pip_keep_torch.py, used by setup_env.sh.

Run against the environment running the tests (the project's .venv under ``make test``), always with
``pip install --dry-run``: nothing is installed or removed.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pip_keep_torch.py"
spec = importlib.util.spec_from_file_location("pip_keep_torch", SCRIPT)
keep_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keep_torch)


def run_keep_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def wheel_requiring(tmp_path: Path, requirement: str) -> Path:
    """A minimal pure-Python wheel whose only dependency is ``requirement``."""
    dist = "needs_other_torch-0.1.dist-info"
    files = {
        "needs_other_torch/__init__.py": "",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: needs-other-torch\nVersion: 0.1\n"
                            f"Requires-Dist: {requirement}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    path = tmp_path / "needs_other_torch-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


@pytest.mark.slow
def test_hicmae_extra_keeps_torch(tmp_path):
    """timm (extra `hicmae`) reaches torch through torchvision, whose newest release wants a newer torch."""
    torch_before = metadata.version("torch")
    pins, notes = keep_torch.constraints()
    assert pins[0] == f"torch=={torch_before}"
    report = tmp_path / "report.json"
    done = run_keep_torch("--dry-run", "-q", "--report", str(report), "-e", ".[hicmae]")
    assert metadata.version("torch") == torch_before

    if any(note.startswith("torchvision:") for note in notes):
        # No torchvision built for this torch (e.g. a +cpu torch and only CUDA torchvision wheels on the
        # indexes): nothing fits, and the message says who wanted what instead of installing a broken build.
        assert done.returncode != 0
        assert "depends on torchvision" in done.stderr, done.stderr
        assert f"keeps torch=={torch_before}" in done.stderr and "TORCH_INDEX_URL=" in done.stderr
        return

    assert done.returncode == 0, done.stderr
    installs = {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}
    assert "torch" not in installs, f"would replace torch {torch_before} by {installs['torch']['metadata']['version']}"
    assert "timm" in installs or keep_torch.installed("timm"), "the hicmae extra resolved to nothing"
    public, _, build = torch_before.partition("+")
    if "torchvision" in installs:  # the release made for this torch, in its build
        vision = installs["torchvision"]["metadata"]
        assert f"torch=={public}" in [r.replace(" ", "") for r in vision.get("requires_dist", [])], vision
        assert not build or vision["version"].endswith("+" + build), vision["version"]
    if build == "cpu":  # the 3 GB of CUDA libraries next to a CPU torch
        assert not [name for name in installs if name.startswith("nvidia-")]


def test_package_wanting_another_torch_fails_naming_it(tmp_path):
    torch_before = metadata.version("torch")
    wheel = wheel_requiring(tmp_path, "torch==2.0.0")
    done = run_keep_torch("--dry-run", "-q", "--no-index", str(wheel))
    assert done.returncode != 0
    assert "needs-other-torch 0.1 depends on torch==2.0.0" in done.stderr, done.stderr
    assert f"keeps torch=={torch_before}" in done.stderr
    assert metadata.version("torch") == torch_before


def test_culprits_read_from_pips_conflict_report():
    log = """2026-12-01T07:08:30,431 INFO: pip is looking at multiple versions of xformers
2026-12-01T07:08:30,431 The conflict is caused by:
2026-12-01T07:08:30,431     avfmae[peers] 0.1.0 depends on torch>=2.4
2026-12-01T07:08:30,431     xformers 0.0.33 depends on torch==2.14.1
2026-12-01T07:08:30,431     xformers 0.0.32 depends on torch==2.12.0
2026-12-01T07:08:30,431     flash-attn 2.8.0 depends on torchvision==0.29.1
2026-12-01T07:08:30,431     einops 0.8.2 depends on numpy
2026-12-01T07:08:30,432     The user requested (constraint) torch==2.13.0+cpu
2026-12-01T07:08:30,432
2026-12-01T07:08:30,432     timm 1.0 depends on torchvision
"""
    assert keep_torch.culprits(log) == ["xformers 0.0.33 depends on torch==2.14.1",
                                        "flash-attn 2.8.0 depends on torchvision==0.29.1"]


def test_setup_rejects_an_unknown_extra(tmp_path):
    # A copy, so that a regression could not install into the project's environment; PYTHON=false
    # makes creating a venv fail loudly instead.
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    done = subprocess.run([str(tmp_path / "scripts" / "setup_env.sh"), "dev,hicmea"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "false"}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "no extra 'hicmea'" in done.stderr and "hicmae" in done.stderr
    assert not (tmp_path / ".venv").exists()
