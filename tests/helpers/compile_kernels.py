"""Compile every mae_kernels Triton kernel to a CUDA cubin, on a machine without a GPU.

Triton's CPU interpreter runs the kernels' Python semantics but never lowers them, so GPU-only
code-generation errors (tl.dot shape/dtype rules, 16-bit casts, int64 offsets, layout conversions,
ptxas failures) slip through the interpreter tests. This script:

1. records launches instead of running them: ``JITFunction.run`` is replaced by a recorder that binds
   the arguments exactly as Triton's launcher does for a CUDA target (same int / pointer-alignment
   specialisation, same constexprs), and ``Autotuner.run`` records its pruned configs instead of
   benchmarking them;
2. calls the public ops, forward and backward, on CPU tensors at the LGI-Former stage shapes (the
   dispatch gate is forced to the Triton path; nothing is launched, outputs stay uninitialised);
3. de-duplicates the recorded specialisations and compiles each for sm_80 and sm_90 (ptxas ships
   in the triton wheel), in a pool of worker processes;
4. prints one line ``RESULT {json}``: launches per kernel, compiles per target, failures with the
   compiler's error text (MLIR diagnostics included), the launchable kernels found in the package,
   and per compile its registers and spills (the ptxas -v log Triton prints with
   TRITON_DUMP_PTXAS_LOG), shared memory (Triton's metadata) and occupancy (mae_kernels.resources).

The ops run once per target, the autotuners pruning as on a device of that architecture
(``mae_kernels.resources.device_arch`` is patched), and each recorded launch compiles for the
targets that recorded it.

Covered: every launchable @triton.jit kernel of mae_kernels, at the shapes/dtypes in ``run_ops()``,
with the exact signature specialisation (divisibility by 16, ints equal to 1) the GPU launcher would
use for those tensors. Autotuned kernels: of the configs left after ``early_config_prune``, at most
``--max-configs`` spread evenly from the smallest to the largest tile, plus the interpreter's tiling
when it survives pruning, with 4 warps where listed (0 = all configs, the full sweep). Not covered:
configs beyond the cap (tests/test_kernel_resources.py covers every config through the measured
table of tests/helpers/kernel_resources.py) and other shapes' specialisations. Must run with TRITON_INTERPRET
unset: Triton picks interpreter or compiler when ``@triton.jit`` decorates, i.e. at import.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from mae_kernels import resources
from mae_kernels.resources import assess, parse_ptxas_log
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from avfmae.config import get_config
from avfmae.lgi_former import attention_shapes

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
RESOURCE_FIELDS = ("regs", "spill_stores", "spill_loads", "shared")

_BACKEND = None  # CUDA backend used to bind arguments exactly as the GPU launcher does
_jobs: dict[str, dict] = {}  # specialisation key -> job
_launches: dict[str, int] = {}  # kernel -> launches recorded
_problems: list[dict] = []
_max_configs = 4
_target = "sm_90"  # the architecture the autotuners prune for while recording


# --- recording ----------------------------------------------------------------------------------------


def kernel_name(fn: JITFunction) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__name__}"


def _record_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: bind like a CUDA launch, store the specialisation, launch nothing."""
    binder = create_function_from_signature(self.signature, self.params, _BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = self._pack_args(_BACKEND, kwargs, bound_args, specialization, options)
    name = kernel_name(self)
    _launches[name] = _launches.get(name, 0) + 1
    grid = grid(bound_args) if callable(grid) else grid
    if any(g < 1 or g > limit for g, limit in zip(grid, CUDA_GRID_LIMITS)) or len(grid) > 3:
        _problems.append({"kernel": name, "error": f"grid {tuple(grid)} outside CUDA limits"})
    job = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": signature,
           "constexprs": [[list(k), v] for k, v in constexprs.items()],
           "attrs": [[list(k), v] for k, v in attrs.items()],
           "options": {k: kwargs[k] for k in OPTION_KEYS if kwargs.get(k) is not None}}
    key = json.dumps(job, sort_keys=True, default=str)
    entry = _jobs.setdefault(key, {**job, "kernel": name, "launches": 0, "targets": []})
    entry["launches"] += 1
    if _target not in entry["targets"]:
        entry["targets"].append(_target)


def select_configs(pruned: list, max_configs: int, interpreter_tile: tuple[int, int] | None) -> list:
    """At most max_configs of the pruned configs, spread evenly from first to last (0: all of them),
    plus the first one with the interpreter's tiling, so GPU codegen covers what the tests ran."""
    if max_configs <= 0 or len(pruned) <= max_configs:
        return list(pruned)
    step = (len(pruned) - 1) / max(1, max_configs - 1)
    chosen = [pruned[round(i * step)] for i in range(max_configs)]
    if interpreter_tile is not None:
        same = [c for c in pruned if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N")) == interpreter_tile]
        if same and not any(c in chosen for c in same):
            # Triton's default 4 warps, as the interpreter's plain launch (2 warps on a 64x64 fp32 tile
            # spills so hard that ptxas needs minutes)
            chosen.append(next((c for c in same if c.num_warps == 4), same[0]))
    return chosen


def _interpreter_tile(tuner: Autotuner) -> tuple[int, int] | None:
    """The fixed tiling mae_kernels' _launch runs under the interpreter for this autotuned kernel."""
    mod = sys.modules.get(tuner.fn.fn.__module__)
    tiles = getattr(mod, "INTERPRETER_TILES", None)
    if tiles is None:
        return None
    pack = tuner.nargs.get("PACK", "packed" in tuner.fn.fn.__name__)
    return tuple(tiles["packed" if pack else "looped"])


def _record_autotuned(self: Autotuner, *args, **kwargs):
    """Stands in for Autotuner.run: record a launch per selected pruned config instead of benchmarking."""
    self.nargs = {**dict(zip(self.arg_names, args)), **kwargs}
    pruned = self.prune_configs(kwargs)
    for config in select_configs(pruned, _max_configs, _interpreter_tile(self)):
        self.fn.run(*args, **kwargs, **config.all_kwargs())
    self.nargs = None


# --- the launches the ops make -------------------------------------------------------------------------

# (G, Lq, Lk) of the LGI stages compiled here: packed tiles (stage I, pre-training), the looped ones
# both ways (stages III/IV) and a long stage I (fine-tuning); tests/test_kernel_resources.py checks the
# pruning at every stage shape, which costs no compile
ATTENTION_SHAPES = [attention_shapes(get_config("base"))[name] for name in (
    "I-video-pretrain", "I-audio-pretrain", "III-video-pretrain", "IV-video-pretrain", "I-video-finetune")]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CHANNELS = (512, 1536, 256)


def _attention_inputs(G, Lq, Lk, D, dtype, B=2, H=2):
    """Self-attention as slices of one fused qkv projection (as the LGI-Former calls it); cross separate."""
    if Lq == Lk:
        return torch.randn(B, G, Lq, 3, H, D, dtype=dtype, requires_grad=True).unbind(3)
    q = torch.randn(B, G, Lq, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, G, Lk, H, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, G, Lk, H, D, dtype=dtype, requires_grad=True)
    return q, k, v


def run_ops(mk) -> None:
    """Forward and backward of every public op at representative shapes (launches are only recorded)."""
    for G, Lq, Lk in ATTENTION_SHAPES:
        for D in (64, 80):
            for dtype in DTYPES:
                q, k, v = _attention_inputs(G, Lq, Lk, D, dtype)
                mk.grouped_attention(q, k, v).backward(torch.ones(2, G, Lq, 2, D, dtype=dtype))
    for C, dtype in zip(CHANNELS * 3, [d for d in DTYPES for _ in CHANNELS]):
        B, N, M = 2, 40, 12
        for idx_dtype in (torch.int32, torch.int64):
            idx = torch.stack([torch.randperm(N)[:M] for _ in range(B)]).to(idx_dtype)
            for pos_shape in (None, (N, C), (B, N, C)):
                x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
                pos = torch.randn(pos_shape, dtype=dtype, requires_grad=True) if pos_shape else None
                mk.gather_tokens(x, idx, pos).sum().backward()
        enc = torch.randn(B, M, C, dtype=dtype, requires_grad=True)
        token = torch.randn(1, 1, C, dtype=dtype, requires_grad=True)
        pos = torch.randn(N, C, dtype=dtype, requires_grad=True)
        dec_idx = torch.randint(0, N, (B, 20))
        mk.assemble_decoder_tokens(enc, token, pos, idx, dec_idx).sum().backward()
        patches = torch.randn(B, N, C, dtype=dtype)
        for norm_pix in (True, False):
            for groups in (1, 3):
                for valid in (None, torch.rand(B, M) > 0.3):
                    if C % groups:
                        continue
                    pred = torch.randn(B, M, C, dtype=dtype, requires_grad=True)
                    mk.masked_mse_loss(pred, patches, idx, valid, norm_pix, norm_groups=groups).backward()


def record(max_configs: int, targets: list[str]) -> None:
    """Run the ops once per target, the autotuners pruning as on a device of that architecture."""
    global _BACKEND, _max_configs, _target
    _BACKEND, _max_configs = make_backend(TARGETS["sm_90"]), max_configs
    mk = importlib.import_module("mae_kernels")
    JITFunction.run = _record_launch
    Autotuner.run = _record_autotuned
    for mod in _kernel_modules(mk):
        if hasattr(mod, "use_triton"):
            mod.use_triton = lambda *tensors: True  # Triton path for CPU tensors: nothing is launched
        if hasattr(mod, "runs_triton"):  # the custom ops' own choice, made from the backend name they get
            mod.runs_triton = lambda name, *tensors: True
    for _target in targets:
        resources.device_arch = lambda t, arch=_target: arch
        run_ops(mk)


# --- the kernels the package defines -----------------------------------------------------------------


def _kernel_modules(mk):
    return [importlib.import_module(f"{mk.__name__}.{m.name}") for m in pkgutil.iter_modules(mk.__path__)]


def entry_points(mk) -> list[str]:
    """Launchable kernels: @triton.jit functions of the package that no other @triton.jit function calls."""
    fns = {kernel_name(f): f for mod in _kernel_modules(mk) for f in vars(mod).values()
           if isinstance(f, JITFunction) and f.fn.__module__ == mod.__name__}
    called = {name for name, fn in fns.items() for other in fns.values()
              if other is not fn and re.search(rf"\b{re.escape(fn.fn.__name__)}\s*\(", other.src)}
    return sorted(set(fns) - called)


# --- compiling ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_to(path):
    """MLIR and ptxas diagnostics go to fd 2, not into the exception: capture them for the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def ptxas_resources(compiled, log: str) -> dict:
    """Registers and spills from the ptxas -v log Triton printed; on a cache hit (no log) rerun ptxas -v
    on the kernel's PTX with the flags Triton uses (the log is not cached)."""
    if "Used " not in log:
        arch = sm_arch_from_capability(compiled.metadata.target.arch)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            cmd = [get_ptxas(compiled.metadata.target.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={arch}", ptx.name, "-o", os.devnull]
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return parse_ptxas_log(log)


def compile_job(job: dict, target_name: str) -> dict:
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(fn=fn, signature=job["signature"], constexprs={tuple(k): v for k, v in job["constexprs"]},
                    attrs={tuple(k): v for k, v in job["attrs"]})
    result = {"kernel": job["kernel"], "target": target_name, "options": job["options"],
              "constexprs": {list(job["signature"])[k[0]]: v for k, v in job["constexprs"]}}
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".log") as log, _stderr_to(log.name) as captured:
        try:
            with contextlib.redirect_stdout(io.StringIO()) as ptxas_log:  # make_cubin prints ptxas -v there
                compiled = triton.compile(src, target=TARGETS[target_name], options=dict(job["options"]))
            result.update(ok=True, cubin_bytes=len(compiled.asm.get("cubin", b"")),
                          shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                          **ptxas_resources(compiled, ptxas_log.getvalue()))
        except Exception as exc:  # every compiler failure is a finding to report, not a crash
            captured.seek(0)
            result.update(ok=False, signature=job["signature"],
                          error=f"{type(exc).__name__}: {exc}\n{captured.read()[-4000:]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def compile_all(jobs: list[dict], workers: int) -> list[dict]:
    tasks = [(job, t) for job in jobs for t in job["targets"]]
    if workers <= 1:
        return [compile_job(*task) for task in tasks]
    ctx = multiprocessing.get_context("fork")  # workers reuse the parent's imports; they run no torch ops
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(compile_job, *zip(*tasks)))


def summarise(results: list[dict], jobs: list[dict], entries: list[str]) -> dict:
    per_kernel: dict[str, dict] = {}
    for r in results:
        k = per_kernel.setdefault(r["kernel"], {"launches": _launches.get(r["kernel"], 0), "signatures": 0})
        k[r["target"]] = k.get(r["target"], 0) + r["ok"]
        if r["ok"]:
            k["max_shared"] = max(k.get("max_shared", 0), r["shared"])
            k["min_cubin_bytes"] = min(k.get("min_cubin_bytes", r["cubin_bytes"]), r["cubin_bytes"])
    for job in jobs:
        k = per_kernel.setdefault(job["kernel"], {"launches": _launches.get(job["kernel"], 0), "signatures": 0})
        k["signatures"] += 1
        for t in job["targets"]:
            k[f"signatures_{t}"] = k.get(f"signatures_{t}", 0) + 1
    assessed = [{**{k: r[k] for k in ("kernel", "target", "options", "constexprs")},
                 **assess({f: r[f] for f in RESOURCE_FIELDS}, r["num_warps"], r["target"])}
                for r in results if r["ok"]]
    return {"entry_points": entries, "recorded": sorted(_launches), "kernels": per_kernel,
            "compiles": len(results), "failures": [r for r in results if not r["ok"]] + _problems,
            "resources": assessed,
            "compile_seconds": round(sum(r["seconds"] for r in results), 1),
            "slowest": sorted(results, key=lambda r: -r["seconds"])[:8]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-configs", type=int, default=4,
                        help="autotune configs per launch site after pruning (0 = all)")
    parser.add_argument("--targets", default="sm_90,sm_80", help=f"comma-separated, of {sorted(TARGETS)}")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled")
    triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log: parsed per compile
    record(args.max_configs, args.targets.split(","))
    jobs = list(_jobs.values())
    results = compile_all(jobs, args.workers)
    return summarise(results, jobs, entry_points(importlib.import_module("mae_kernels")))


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()))
