"""mae_kernels stands alone: it imports and runs with only torch and triton (avfmae, dali_pipelines and
einops blocked by an import hook in a fresh interpreter), and kernels/pyproject.toml builds a wheel that
holds exactly the mae_kernels package, at mae_kernels.__version__."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import mae_kernels

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"

ALONE = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("avfmae", "dali_pipelines", "einops"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
import torch
import mae_kernels
from mae_kernels.integrations import mae, videomae

with mae_kernels.backend("torch"):
    x = torch.randn(2, 6, 8, requires_grad=True)
    idx = mae_kernels.mask_to_indices(torch.arange(6).expand(2, 6) % 2 == 0, 3)
    out = mae_kernels.gather_tokens(x, idx, torch.randn(1, 6, 8))
    loss = mae_kernels.masked_mse_loss(out, torch.randn(2, 6, 8), idx, norm_pix=True)
    q = torch.randn(2, 1, 6, 2, 16)
    att = mae_kernels.grouped_attention(q, q, q)
    (loss + att.sum()).backward()
assert not any(m.split(".")[0] in ("avfmae", "dali_pipelines", "einops") for m in sys.modules)
print(mae_kernels.__version__)
"""


def test_imports_and_runs_with_only_torch_and_triton(tmp_path):
    out = subprocess.run([sys.executable, "-c", ALONE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mae_kernels.__version__


def test_the_subdirectory_builds_a_wheel_of_mae_kernels_alone(tmp_path):
    """``pip install ./kernels`` (or ``git+...#subdirectory=kernels``) installs this wheel: no network,
    setuptools from the environment. Built from a copy: setuptools writes build/ and egg-info in place."""
    source = shutil.copytree(KERNELS, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                                        "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("mae_kernels-*.whl")
    assert wheel.name.startswith(f"mae_kernels-{mae_kernels.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"mae_kernels"}
    assert {"mae_kernels/integrations/mae.py", "mae_kernels/masks.py", "mae_kernels/dispatch.py"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(f"mae_kernels-{mae_kernels.__version__}.dist-info/METADATA").decode()
    requires = sorted(line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split("<")[0].strip()
                      for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["torch", "triton"]
