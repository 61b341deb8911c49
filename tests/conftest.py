"""Test-wide settings.

Triton decides at import time whether kernels are compiled or interpreted, so TRITON_INTERPRET=1 is
set here, before anything imports mae_kernels: without a GPU the kernels then run on Triton's CPU
interpreter. Model-level tests default to the fast torch reference backend; kernel tests opt into the
Triton path explicitly with ``mae_kernels.backend("triton")`` (fixture ``triton_backend``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MAE_KERNELS_BACKEND", "torch")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
