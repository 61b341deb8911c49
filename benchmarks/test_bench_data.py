"""Data loading throughput: the DALI pipeline vs a PyAV + torch DataLoader doing the same work.

Both load the same synthetic dataset (2.6 s clips, 176x176, 25 fps; 16 frames at stride 4 cropped to
160, 256x128 fbank) in training mode with the same number of threads (DALI worker threads vs
DataLoader worker processes), batch 8. Each case records ``clips_per_s`` in ``extra_info``; compare
cases only within one run (CPU figures depend on the machine's load). On a CUDA machine two more
cases run: DALI with NVDEC on an H.264 copy of the dataset, and the PyAV loader on the same files.

    pytest benchmarks/test_bench_data.py --benchmark-only
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dali_pipelines import build_loader
from dali_pipelines.baseline import build_baseline_loader
from dali_pipelines.synthetic import generate_dataset

CLIPS = 32
BATCH = 8
THREADS = min(4, os.cpu_count() or 1)
CASES = [
    pytest.param("dali", "cpu", "vp9", id="dali-cpu-vp9"),
    pytest.param("pyav", "cpu", "vp9", id="pyav-vp9"),
    pytest.param("dali", "gpu", "h264", id="dali-nvdec-h264", marks=pytest.mark.gpu),
    pytest.param("pyav", "cpu", "h264", id="pyav-h264", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_data")
    codecs = ["vp9", "h264"] if torch.cuda.is_available() else ["vp9"]
    return {codec: generate_dataset(root / codec, clips=CLIPS, classes=4, num_frames=64, size=176,
                                    codec=codec) for codec in codecs}


def one_epoch(loader) -> int:
    clips = 0
    for batch in loader:
        clips += len(batch["index"])
        if batch["video"].is_cuda:
            torch.cuda.synchronize()
    return clips


@pytest.mark.slow
@pytest.mark.parametrize("kind, device, codec", CASES)
def test_bench_data_loading(benchmark, datasets: dict[str, Path], kind: str, device: str, codec: str) -> None:
    if codec == "h264" and not torch.cuda.is_available():
        pytest.skip("H.264 cases compare with NVDEC, which needs CUDA")
    benchmark.group = f"data loading {codec}, batch {BATCH}, {THREADS} threads"  # one codec per ratio
    manifest = datasets[codec]
    if kind == "dali":
        loader = build_loader(manifest, BATCH, train=True, device=device, num_threads=THREADS, seed=0)
    else:
        loader = build_baseline_loader(manifest, BATCH, train=True, num_workers=THREADS, seed=0)
    clips = one_epoch(loader)  # warm-up: first-epoch probing, worker start-up, DALI buffers
    assert clips == CLIPS // BATCH * BATCH
    benchmark.pedantic(one_epoch, args=(loader,), rounds=3, iterations=1)
    benchmark.extra_info.update(
        clips_per_s=clips / benchmark.stats.stats.mean, clips_per_epoch=clips, threads=THREADS, loader=kind,
        device=torch.cuda.get_device_name() if device == "gpu" else "cpu", codec=codec,
        role="ours" if kind == "dali" else "baseline",  # benchmarks/report.py: ratio = PyAV time / DALI time
    )
