"""Data loading throughput: our DALI pipeline against the loaders people actually run.

Every case loads the same synthetic dataset (2.6 s clips, 176x176, 25 fps, 16 kHz wav), once encoded
as VP9 (WebM) and once as H.264 (MP4), in training mode, batch 8, and does the same work per clip:
16 frames at stride 4, a random crop resized to 160 (HiCMAE: its multi-scale crop) and a flip,
ImageNet normalisation, a 256 x 128 Kaldi log-mel fbank of the paired audio. Every case gets the same
number of CPU threads: DALI worker threads, or DataLoader worker processes of one decoding thread each.

* ``dali-cpu`` (ours): DALI's CPU pipeline, DALI's video decoder (VP8/VP9/MJPEG only).
* ``dali-torchcodec`` (ours): the same DALI CPU pipeline, with torchcodec decoding the frames inside
  its external source (``video_decoder="torchcodec"``; any codec FFmpeg has, H.264 included). Its
  decoding runs on a pool of as many threads beside DALI's workers, so where cores are free its wall
  clock has up to twice the threads of the others; clips per CPU-second compares it fairly.
* ``dali-nvdec`` (ours, CUDA only): decoding on NVDEC, everything after it on the GPU.
* ``pyav`` (the baseline): :mod:`dali_pipelines.baseline`, PyAV + torch in DataLoader workers.
* ``torchcodec`` (peer): the same DataLoader and transforms with torchcodec's decoders (CPU).
* ``hicmae`` (peer): HiCMAE's own pre-training dataset (decord + torchaudio) in its DataLoader
  (:mod:`benchmarks.hicmae_data`); only with ``--hicmae-path`` / ``$HICMAE_PATH``.

Each case records ``clips_per_s`` (wall clock; also per thread) and ``clips_per_cpu_s`` (clips per
CPU-second of the loader's process and workers: the cost of a clip, which a busy machine hardly
changes) in ``extra_info``; benchmarks/report.py tabulates them by decoder and codec. Compare cases
only within one run (wall-clock figures depend on the machine's load).
Cases whose library is missing are skipped with the reason.

    pytest benchmarks/test_bench_data.py --benchmark-only [--hicmae-path PATH]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from dali_pipelines import LoaderOptions, build_loader, read_manifest
from dali_pipelines.baseline import build_baseline_loader, torchcodec_missing
from dali_pipelines.synthetic import generate_dataset

CLIPS = 32
BATCH = 8
ROUNDS = 3
THREADS = min(4, os.cpu_count() or 1)
OURS = LoaderOptions(num_threads=THREADS, seed=0)  # our loader's settings in every case
ROLES = {"dali-cpu": "ours", "dali-torchcodec": "ours", "dali-nvdec": "ours", "pyav": "baseline",
         "torchcodec": "peer", "hicmae": "peer"}
DECODERS = {"dali-cpu": "DALI (CPU)", "dali-torchcodec": "torchcodec → DALI", "dali-nvdec": "DALI (NVDEC)",
            "pyav": "PyAV", "torchcodec": "torchcodec", "hicmae": "decord (HiCMAE)"}
CASES = [
    pytest.param("dali-cpu", "vp9", id="dali-cpu-vp9"),
    pytest.param("dali-torchcodec", "vp9", id="dali-torchcodec-vp9"),
    pytest.param("pyav", "vp9", id="pyav-vp9"),
    pytest.param("torchcodec", "vp9", id="torchcodec-vp9"),
    pytest.param("hicmae", "vp9", id="hicmae-vp9"),
    pytest.param("dali-torchcodec", "h264", id="dali-torchcodec-h264"),
    pytest.param("pyav", "h264", id="pyav-h264"),
    pytest.param("torchcodec", "h264", id="torchcodec-h264"),
    pytest.param("hicmae", "h264", id="hicmae-h264"),
    pytest.param("dali-nvdec", "h264", id="dali-nvdec-h264", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_data")
    return {codec: generate_dataset(root / codec, clips=CLIPS, classes=4, num_frames=64, size=176, codec=codec)
            for codec in ("vp9", "h264")}


def one_epoch(loader) -> int:
    clips = 0
    for batch in loader:
        video = batch["video"] if isinstance(batch, dict) else batch[0]  # HiCMAE yields a tuple
        clips += len(video)
        if video.is_cuda:
            torch.cuda.synchronize()
    return clips


def cpu_seconds(loader) -> float | None:
    """CPU time so far of this process (DALI's threads included) and of the loader's DataLoader worker
    processes (Linux /proc); None where it cannot be read. Unlike wall time it hardly moves when other
    work shares the machine, so clips per CPU-second compares loaders on a busy machine too."""
    total = time.process_time()
    workers = getattr(getattr(loader, "_iterator", None), "_workers", [])
    for worker in workers:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def make_loader(kind: str, manifest: Path, hicmae_path: Path | None, work_dir: Path):
    if kind in ("dali-cpu", "dali-nvdec"):
        device = "gpu" if kind == "dali-nvdec" else "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            pytest.skip("DALI's NVDEC decoder needs CUDA")
        return build_loader(manifest, BATCH, True, OURS, device=device)
    if kind in ("torchcodec", "dali-torchcodec") and (why := torchcodec_missing()):
        pytest.skip(why)
    if kind == "dali-torchcodec":
        return build_loader(manifest, BATCH, True, OURS, device="cpu", video_decoder="torchcodec")
    if kind in ("pyav", "torchcodec"):
        return build_baseline_loader(manifest, BATCH, train=True, num_workers=THREADS, seed=0, decoder=kind)
    from benchmarks.hicmae_data import build_hicmae_loader
    from benchmarks.hicmae_peer import PeerUnavailable

    if hicmae_path is None:
        pytest.skip("HiCMAE's own loader is timed only with --hicmae-path or $HICMAE_PATH (a HiCMAE checkout)")
    try:
        return build_hicmae_loader(hicmae_path, read_manifest(manifest), work_dir, BATCH, THREADS, seed=0)
    except PeerUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.slow
@pytest.mark.parametrize("kind, codec", CASES)
def test_bench_data_loading(benchmark, datasets: dict[str, Path], hicmae_path, tmp_path: Path, kind: str,
                            codec: str) -> None:
    benchmark.group = f"data loading {codec}, batch {BATCH}, {THREADS} threads"  # one codec per ratio
    loader = make_loader(kind, datasets[codec], hicmae_path, tmp_path)
    clips = one_epoch(loader)  # warm-up: first-epoch probing, worker start-up, DALI buffers
    assert clips == CLIPS // BATCH * BATCH
    cpu_start = cpu_seconds(loader)
    benchmark.pedantic(one_epoch, args=(loader,), rounds=ROUNDS, iterations=1)
    cpu_end = cpu_seconds(loader)
    rate = clips / benchmark.stats.stats.mean
    if cpu_start is not None and cpu_end is not None and cpu_end > cpu_start:
        benchmark.extra_info["clips_per_cpu_s"] = clips * ROUNDS / (cpu_end - cpu_start)
    benchmark.extra_info.update(
        clips_per_s=rate, clips_per_s_per_thread=rate / THREADS, clips_per_epoch=clips, threads=THREADS,
        loader=kind, decoder=DECODERS[kind], codec=codec,
        device=torch.cuda.get_device_name() if kind == "dali-nvdec" else "cpu",
        role=ROLES[kind],  # benchmarks/report.py: ratio = PyAV time / the case's time
    )
