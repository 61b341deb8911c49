"""Test-wide settings.

Triton decides at import time whether kernels are compiled or interpreted, so TRITON_INTERPRET=1 is
set here, before anything imports mae_kernels: without a GPU the kernels then run on Triton's CPU
interpreter. Model-level tests default to the fast torch reference backend; kernel tests opt into the
Triton path explicitly with ``mae_kernels.backend("triton")`` (fixture ``triton_backend``).

Every test and every test file is checked to leave process-wide state as it found it (environment,
torch switches, the compiler configs, the kernels' backend: tests/helpers/global_state.py): one that
does not fails, naming what it changed, and the state is put back for the tests after it. Files run in
two workers in any order, so a leak would otherwise pass or fail other files by the luck of scheduling.
``--file-order reversed`` runs the files in the opposite order (`TEST_ORDER=reversed make test`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MAE_KERNELS_BACKEND", "torch")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: E402

# autouse: every test and every test file must leave process-wide state as it found it
from tests.helpers.global_state import (  # noqa: E402, F401
    each_file_leaves_global_state_unchanged,
    each_test_leaves_global_state_unchanged,
)

# Two things the first CPU compile of a process changes for good, done now so that the state every test is
# compared against already holds them: inductor writes TORCHINDUCTOR_CACHE_DIR into the environment when it
# is unset, and its C++ builder imports setuptools, which appends its _vendor folder to sys.path.
cache_dir()
import setuptools  # noqa: E402, F401, I001

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend():
    import mae_kernels

    with mae_kernels.backend("triton"):
        yield


@pytest.fixture
def device() -> str:
    return DEVICE


def skip_bf16_if_interpreted(dtype: torch.dtype) -> None:
    """The interpreter keeps bf16 as raw 16-bit integers: bf16 kernel math is only testable on a GPU."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is not emulated by the Triton interpreter; covered on GPU runs")


def pytest_addoption(parser):
    parser.addoption("--file-order", choices=("forward", "reversed"), default="forward",
                     help="run the test files in collection order or reversed (tests inside a file keep theirs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("file_order") == "reversed":
        files = list(dict.fromkeys(item.path for item in items))
        rank = {path: i for i, path in enumerate(reversed(files))}
        items.sort(key=lambda item: rank[item.path])  # stable: a file's tests keep their order
