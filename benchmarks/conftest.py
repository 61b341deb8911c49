"""Shared benchmark helpers: device choice, CUDA timing with a flushed L2, bandwidth bookkeeping.

On a machine without CUDA the cases run the torch reference paths at reduced sizes (the interpreter
is a correctness tool, never timed); ratios are only meaningful between cases of one run.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
os.environ.setdefault("MAE_KERNELS_BACKEND", "auto")

_l2_flush = None


def flush_l2() -> None:
    """Overwrite the L2 cache so each timed call reads from HBM (a figure above HBM speed means L2)."""
    global _l2_flush
    if not CUDA:
        return
    if _l2_flush is None:
        _l2_flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _l2_flush.zero_()


def run_timed(benchmark, fn, *, rounds: int = 20, bytes_moved: int | None = None, flops: float | None = None):
    """Time fn with pytest-benchmark; on CUDA flush L2 before and synchronise after every call."""
    def setup():
        flush_l2()
        if CUDA:
            torch.cuda.synchronize()

    def call():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    fn()  # warm-up: compile / autotune outside the timed region
    result = benchmark.pedantic(call, setup=setup, rounds=rounds if CUDA else max(3, rounds // 4), iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None and stats.min > 0:
        if bytes_moved is not None:
            benchmark.extra_info["GB/s"] = round(bytes_moved / stats.median / 1e9, 2)
        if flops is not None:
            benchmark.extra_info["TFLOP/s"] = round(flops / stats.median / 1e12, 3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    return result


@pytest.fixture
def device() -> str:
    return DEVICE
