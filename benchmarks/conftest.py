"""Shared benchmark helpers: device choice, CUDA timing with a flushed L2, bandwidth bookkeeping.

On a machine without CUDA the cases run the torch reference paths at reduced sizes (the interpreter
is a correctness tool, never timed); ratios are only meaningful between cases of one run.

Also the suite-wide plumbing read by ``python -m benchmarks.report``: the ``--hicmae-path`` option
(or ``$HICMAE_PATH``), device and library versions added to the JSON's ``machine_info["avfmae"]``,
and ``avfmae_outcomes`` in the JSON: cases that were skipped or failed, with the reason (they never
reach pytest-benchmark's own list).
"""

import importlib.metadata
import os
from pathlib import Path

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


# --- suite-wide options, versions and outcomes (read by benchmarks/report.py) ---------------------

HICMAE_ENV = "HICMAE_PATH"
OUTCOMES: dict[str, dict[str, str]] = {}  # nodeid -> {"outcome": "skipped"|"failed", "reason": ...}


def pytest_addoption(parser):
    parser.addoption("--hicmae-path", default=None,
                     help=f"checkout of github.com/sunlicai/HiCMAE: also time its own pre-training model "
                          f"(default: ${HICMAE_ENV}; those cases are skipped when neither is set)")


AUTO_JSON = Path(".benchmarks") / "latest.json"
_auto: dict = {}  # set when this run writes its own JSON and report (no --benchmark-json given)


def pytest_configure(config):
    config.addinivalue_line("markers", "step: end-to-end pre-training step benchmarks")
    # `pytest benchmarks --benchmark-only` alone leaves a report: save the JSON ourselves unless the user
    # chose where it goes (runs after ours: pytest-benchmark's own configure hook is trylast)
    if config.getoption("benchmark_json", None) is None and not config.getoption("benchmark_disable", False):
        path = Path(config.rootpath) / AUTO_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = path
        _auto["json"] = path


@pytest.fixture(scope="session")
def hicmae_path(request):
    """The HiCMAE checkout named by --hicmae-path or $HICMAE_PATH (validated), or None."""
    from benchmarks.hicmae_peer import resolve_checkout

    return resolve_checkout(request.config.getoption("--hicmae-path") or os.environ.get(HICMAE_ENV))


def pytest_runtest_logreport(report):
    # Skipped and failed cases never reach pytest-benchmark's JSON; keep them for the report.
    if report.passed or (report.when != "call" and not (report.failed or report.skipped)):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        if reason.startswith("Skipping non-benchmark"):  # --benchmark-only noise, not a missing case
            return
    else:
        lines = (report.longreprtext or report.outcome).strip().splitlines()
        reason = lines[-1].removeprefix("E").strip() if lines else report.outcome
    OUTCOMES.setdefault(report.nodeid, {"outcome": "skipped" if report.skipped else "failed", "reason": reason})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["avfmae"] = software_versions()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["avfmae_outcomes"] = dict(OUTCOMES)
    if "json" in _auto:
        _auto["data"] = output_json


def pytest_unconfigure(config):
    """Write benchmarks/results/<device>-<date>.md/.png ($BENCH_REPORT_DIR overrides the folder) from this
    run's JSON (see benchmarks/report.py)."""
    if "data" not in _auto:
        return
    from benchmarks.report import write_report

    out_dir = Path(os.environ.get("BENCH_REPORT_DIR", Path(config.rootpath) / "benchmarks" / "results"))
    md, png = write_report(_auto.pop("data"), out_dir, str(_auto["json"]))
    print(f"\nbenchmark report: {md}" + (f" and {png}" if png else ""))


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def software_versions() -> dict:
    """Device and library versions recorded with every result file (None: not installed / no CUDA)."""
    return {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if CUDA else None,
        "cudnn": torch.backends.cudnn.version() if CUDA else None,
        "triton": _dist_version("triton"),
        "dali": _dist_version("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"),
        "timm": _dist_version("timm"),
        "mae_kernels_backend": os.environ.get("MAE_KERNELS_BACKEND", "auto"),
        "cpu_threads": torch.get_num_threads(),
    }
