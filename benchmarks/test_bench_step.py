"""End-to-end pre-training step: AVF-MAE++ against the HiCMAE baseline at the same size and batch.

One step = forward + loss + backward + AdamW step (synthetic tensors, no I/O, fixed masks from
``avfmae.sample_pretrain_masks`` — what ``model.sample_masks`` draws — with a seeded generator). One
benchmark group per size, ``pretrain step <size> B=<batch>``, so every ratio comes out of one run;
the report's baseline is the HiCMAE case.

==================  =========================================================================  =========
case                model                                                                      role
==================  =========================================================================  =========
``avfmae``          AVFMAEPretrain (IAV-CL fusion), mae_kernels backend "auto"                 ours
``avfmae-table4``   AVFMAEPretrain with HiCMAE's fusion: the paper's Table-4 model (1.46x)     ours
``avfmae-vanilla``  the same with vanilla LGI layers (no stage IV): Table 4's middle row (1.49x) ours
``avfmae-torch``    AVFMAEPretrain with ``mae_kernels.backend("torch")``: the kernels' share   reference
``hicmae``          HiCMAEBaseline (vanilla ViT, encoder-only masking), torch backend           baseline
``hicmae-kernels``  HiCMAEBaseline on mae_kernels: the kernels as a drop-in (CUDA only)        ours
``hicmae-official`` HiCMAE's own PretrainAudioVisionTransformer (``--hicmae-path``)            peer
``*-compiled``      the same model under ``torch.compile(fullgraph=True)`` (inductor)          ours
``*-cudagraph``     ``torch.compile(mode="reduce-overhead")``: one CUDA graph per step (CUDA)   ours
==================  =========================================================================  =========

Compiled cases: ``avfmae-compiled``, ``avfmae-table4-compiled`` and ``hicmae-compiled`` (its role is
``reference``: our HiCMAE re-implementation compiled, so AVF-MAE++'s compiled step is also compared
with a compiled HiCMAE); on CUDA also ``avfmae-cudagraph`` and ``hicmae-cudagraph``. The warm-up
step compiles; its time is ``compile_s``.

On CUDA: sizes base, large, huge under bf16 autocast (the GPU run, ``benchmarks/run_gpu.sh``, picks its
own sizes, base and huge, and leaves out the compiled and CUDA-graph cases at huge). On CPU: tiny and
base in fp32 at batch 2, and the "auto" backend *is* the torch reference (no CUDA; the Triton
interpreter is never timed), so ``avfmae`` and ``avfmae-torch`` run the same computation there.
Environment overrides: ``BENCH_STEP_SIZES=base,large``, ``BENCH_STEP_BATCH=16`` or ``base=32,large=16``,
``BENCH_STEP_ROUNDS=10``.

extra_info per case: role, model, backend, size, batch, params_M, flops_per_step (forward+backward,
counted once outside the timing by FlopCounterMode on the torch reference path with SDPA's math
backend; grouped_attention counts through the FLOP formulas mae_kernels registers for its ops, as
attention written in matmuls counts), TFLOP/s, samples_per_s, host_syncs and aten_ops
(forward+backward of the eager model, counted by ``avfmae.op_count``), launches (kernels one step
launches: CUDA kernels on a GPU; on CPU, for compiled cases, the kernels and extern calls the
compiled graphs run) and launches_matmul (the GEMMs and convolutions among them), optimizer_ms (the
AdamW update alone, timed after the step rounds), compile_s and, on CUDA, peak_mem_gb
(max_memory_allocated during the timed steps). ``BENCH_STEP_CASES=avfmae,hicmae`` restricts the cases.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import mae_kernels
import pytest
import torch
import torch._inductor.config as inductor_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import avfmae
from avfmae.op_count import count_launch_kinds, count_ops
from benchmarks import hicmae_peer
from benchmarks.conftest import CUDA, DEVICE

pytestmark = pytest.mark.step
# generated CPU kernels become profiler events, so count_launch_kinds sees them (set before compiling)
inductor_config.cpp.enable_kernel_profile = True

DEFAULT_BATCH = {"base": 32, "large": 16, "huge": 8} if CUDA else {"tiny": 2, "base": 2}
KERNELS = "auto" if CUDA else "torch"  # never the Triton interpreter, even when TRITON_INTERPRET=1


@dataclass(frozen=True)
class Case:
    model: str            # cases sharing a model differ only in the mae_kernels backend
    task: str | None      # avfmae.build_model task; None: HiCMAE's own code
    backend: str
    role: str             # see benchmarks/report.py: ours / reference / baseline / peer
    overrides: tuple = ()
    cuda_only: bool = False
    compile_mode: str | None = None  # torch.compile mode; None: eager


TABLE4 = (("fusion", "hicmae"),)
CASES = {
    "avfmae": Case("avfmae", "pretrain", KERNELS, "ours"),
    "avfmae-table4": Case("avfmae-table4", "pretrain", KERNELS, "ours", TABLE4),
    "avfmae-vanilla": Case("avfmae-vanilla", "pretrain", KERNELS, "ours", (("fusion", "hicmae"), ("lgi", "vanilla"))),
    "avfmae-torch": Case("avfmae", "pretrain", "torch", "reference"),
    "hicmae": Case("hicmae", "hicmae_pretrain", "torch", "baseline"),
    "hicmae-kernels": Case("hicmae", "hicmae_pretrain", KERNELS, "ours", cuda_only=True),
    "hicmae-official": Case("hicmae-official", None, "torch", "peer"),
    "avfmae-compiled": Case("avfmae-compiled", "pretrain", KERNELS, "ours", compile_mode="default"),
    "avfmae-table4-compiled": Case("avfmae-table4-compiled", "pretrain", KERNELS, "ours", TABLE4,
                                   compile_mode="default"),
    "hicmae-compiled": Case("hicmae-compiled", "hicmae_pretrain", KERNELS, "reference", compile_mode="default"),
    "avfmae-cudagraph": Case("avfmae-cudagraph", "pretrain", KERNELS, "ours", cuda_only=True,
                             compile_mode="reduce-overhead"),
    "hicmae-cudagraph": Case("hicmae-cudagraph", "hicmae_pretrain", KERNELS, "reference", cuda_only=True,
                             compile_mode="reduce-overhead"),
}


def _cases() -> list[str]:
    raw = os.environ.get("BENCH_STEP_CASES")
    cases = [c.strip() for c in raw.split(",") if c.strip()] if raw else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"BENCH_STEP_CASES: unknown case(s) {unknown}; expected some of {list(CASES)}")
    return cases


def _sizes() -> list[str]:
    raw = os.environ.get("BENCH_STEP_SIZES")
    sizes = [s.strip() for s in raw.split(",") if s.strip()] if raw else list(DEFAULT_BATCH)
    unknown = [s for s in sizes if s not in avfmae.CONFIGS]
    if unknown:
        raise ValueError(f"BENCH_STEP_SIZES: unknown size(s) {unknown}; expected some of {sorted(avfmae.CONFIGS)}")
    return sizes


def _batch(size: str) -> int:
    raw = os.environ.get("BENCH_STEP_BATCH", "").strip()
    table = dict(DEFAULT_BATCH)
    if raw.isdigit():
        return int(raw)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"BENCH_STEP_BATCH: expected N or size=N[,size=N], got {raw!r}")
        table[name.strip()] = int(value)
    return table.get(size, 2)


def _rounds() -> int:
    raw = os.environ.get("BENCH_STEP_ROUNDS", "10" if CUDA else "3")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"BENCH_STEP_ROUNDS must be a positive integer, got {raw!r}")
    return int(raw)


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def _synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


# torch's AdamW implementations: one fused kernel per parameter group, per-tensor ops batched over a
# group, a Python loop over the tensors
ADAMW_IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def _optimizer(model: torch.nn.Module, implementation: str = "fused") -> torch.optim.Optimizer:
    """AdamW as HiCMAE/VideoMAE pre-train: no decay on 1-D parameters, betas (0.9, 0.95); torch's fused
    implementation on CPU and CUDA alike, as train.py steps, for every case."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), **ADAMW_IMPLEMENTATIONS[implementation])


def _inputs(cfg: avfmae.ModelConfig, batch: int):
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, generator=gen)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.audio_bins, generator=gen)
    masks = avfmae.sample_pretrain_masks(cfg, batch, torch.Generator().manual_seed(1))
    return video.to(DEVICE), audio.to(DEVICE), masks.to(DEVICE)


def _build(case: str, size: str, batch: int, hicmae_path) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The model and a closure returning its training loss on fixed synthetic inputs."""
    spec = CASES[case]
    cfg = avfmae.get_config(size, **dict(spec.overrides))
    video, audio, masks = _inputs(cfg, batch)
    torch.manual_seed(0)
    if spec.task is None:
        if hicmae_path is None:
            pytest.skip("HiCMAE's own model is timed only with --hicmae-path or $HICMAE_PATH "
                        "(a checkout of github.com/sunlicai/HiCMAE)")
        try:
            model = hicmae_peer.build_model(hicmae_path, cfg).to(DEVICE).train()
        except hicmae_peer.PeerUnavailable as err:
            pytest.skip(str(err))
        return model, hicmae_peer.make_loss_fn(model, cfg, video, audio, masks)
    model = avfmae.build_model(size, spec.task, **dict(spec.overrides)).to(DEVICE).train()
    def eager() -> torch.Tensor:
        return model(video, audio, masks)["loss"]

    if spec.compile_mode is None:
        return model, eager
    compiled = torch.compile(model, fullgraph=True, mode=spec.compile_mode)

    def loss_fn() -> torch.Tensor:
        return compiled(video, audio, masks)["loss"]

    loss_fn.eager = eager  # type: ignore[attr-defined]
    return model, loss_fn


_FLOPS: dict[tuple[str, str, int], float] = {}  # FLOPs depend on the model, not on the backend


def count_flops(loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module) -> float:
    """Forward + backward FLOPs of one step: matmuls, convolutions and attention (SDPA's math path for
    torch's own; mae_kernels' custom ops by their registered formulas, whatever backend runs them)."""
    with FlopCounterMode(display=False) as counter:
        with mae_kernels.backend("torch"), sdpa_kernel(SDPBackend.MATH):
            with _autocast():
                loss = loss_fn()
            loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
              backend: str) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    optimizer = _optimizer(model)

    def step() -> None:
        # the backend is chosen at forward time; each op's backward follows that choice
        with mae_kernels.backend(backend), _autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize()

    return step, optimizer


def optimizer_seconds(optimizer: torch.optim.Optimizer, fwd_bwd: Callable[[], None], rounds: int = 3) -> float:
    """Median time of the AdamW update alone, on the gradients of one forward+backward (what a step
    spends outside the model: it scales with the parameter count, not with the tokens)."""
    fwd_bwd()
    times = []
    for _ in range(rounds):
        _synchronize()
        start = time.perf_counter()
        optimizer.step()
        _synchronize()
        times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


BACKEND_LABEL = {"auto": "mae_kernels (Triton)", "torch": "torch reference"}


def forward_backward(loss_fn: Callable[[], torch.Tensor], backend: str) -> Callable[[], None]:
    def fwd_bwd() -> None:
        with mae_kernels.backend(backend), _autocast():
            loss = loss_fn()
        loss.backward()

    return fwd_bwd


def eager_counts(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], backend: str) -> dict[str, int]:
    """Host syncs and aten ops of one eager forward+backward (what launch overhead scales with)."""
    counts = count_ops(forward_backward(loss_fn, backend))
    model.zero_grad(set_to_none=True)
    return {"host_syncs": counts.num_syncs, "aten_ops": counts.ops}


@pytest.mark.parametrize("case", _cases())
@pytest.mark.parametrize("size", _sizes())
def test_pretrain_step(benchmark, hicmae_path, size: str, case: str) -> None:
    spec = CASES[case]
    if spec.cuda_only and not CUDA:
        why, same = ("the kernels backend is the torch reference", "hicmae")
        if spec.compile_mode == "reduce-overhead":
            why, same = "reduce-overhead makes no CUDA graph", f"{case.removesuffix('-cudagraph')}-compiled"
        pytest.skip(f"needs CUDA: on CPU {why}, so it would run the '{same}' case")
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    batch = _batch(size)
    benchmark.group = f"pretrain step {size} B={batch}"
    model, loss_fn = _build(case, size, batch, hicmae_path)
    # FLOPs and op counts are those of the same model run eagerly
    eager_fn = getattr(loss_fn, "eager", loss_fn)
    if (spec.model, size, batch) not in _FLOPS:
        _FLOPS[spec.model, size, batch] = count_flops(eager_fn, model)
    flops = _FLOPS[spec.model, size, batch]
    counts = eager_counts(model, eager_fn, spec.backend) if spec.task is not None else {}
    step, optimizer = make_step(model, loss_fn, spec.backend)
    start = time.perf_counter()
    step()  # warm-up outside the timing: compilation, autotuning, allocator, optimizer state
    compile_s = time.perf_counter() - start
    if spec.compile_mode == "reduce-overhead":
        step()  # the second call records the CUDA graph
    launches = count_launch_kinds(forward_backward(loss_fn, spec.backend))  # model only, not the optimizer
    model.zero_grad(set_to_none=True)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=_rounds(), iterations=1, warmup_rounds=1 if CUDA else 0)
    median = benchmark.stats.stats.median
    optimizer_s = optimizer_seconds(optimizer, forward_backward(loss_fn, spec.backend))
    info = benchmark.extra_info
    info.update(role=spec.role, model=spec.model, size=size, batch=batch,
                backend=BACKEND_LABEL[spec.backend] + ("" if CUDA else " (no CUDA)"),
                dtype="bf16 autocast" if CUDA else "fp32",
                params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                flops_per_step=flops, samples_per_s=round(batch / median, 3),
                device=torch.cuda.get_device_name() if CUDA else "cpu")
    info["TFLOP/s"] = round(flops / median / 1e12, 4)
    info.update(counts)
    info.update(launches=launches.total, launches_matmul=launches.matmuls, optimizer_ms=round(optimizer_s * 1e3, 1))
    if spec.compile_mode is not None:
        info.update(compile_mode=spec.compile_mode, compile_s=round(compile_s, 1))
    if CUDA:
        info["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
