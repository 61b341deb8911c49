"""Measure registers, spills and shared memory of the attention kernels' autotune configs.

    python tests/helpers/kernel_resources.py [--workers 2] [--cache /tmp/kernel-resources.jsonl]

Writes ``kernels/_resource_table.py``, the table the autotuners' prune functions read
(``mae_kernels.resources``), and ``benchmarks/results/kernel-resources.json`` (every measured config
with its occupancy on sm_80 and sm_90, for the benchmark report).

Why a table and not a compile in the prune function: spills are known only after ptxas, and a
compile per config at autotune time costs what benchmarking it would. The table is measured here,
offline, on the cubins of tests/helpers/compile_kernels.py (same recording, same ptxas flags), for
the measurement plan (``measured_here``): every config of the static lists in grouped_attention.py
at BLOCK_D 64, a few at BLOCK_D 16, 32 and 128 (head dims 16, 32, 64, 128 stand for their BLOCK_D),
all within ``precision_fits``; in bf16 (fp16 has the same tensor-core code and register layout; its
launches are checked by tests/test_kernels_compile.py) and fp32; for sm_80 and sm_90. Each entry is
the worst over the LGI stage shapes of the compile test (their specialisations differ). Configs the
plan leaves out are never tuned.

The table carries a hash of each kernel's source (with the @triton.jit helpers it calls) and the
triton version; tests/test_kernel_resources.py fails when they no longer match, i.e. when a kernel
changed and the table was not regenerated. Must run with TRITON_INTERPRET unset (see
compile_kernels.py). A compile that takes longer than ``--timeout`` seconds (ptxas on a hopelessly
spilling config) is recorded as failed, i.e. unusable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import pprint
import re
import signal
import sys
import textwrap
from pathlib import Path

import torch
import triton
from mae_kernels.resources import MEASURED_ARCHS, assess
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = ROOT / "kernels" / "_resource_table.py"
REPORT_JSON = ROOT / "benchmarks" / "results" / "kernel-resources.json"
TABLE_HEAD_DIMS = (16, 32, 64, 128)  # one per BLOCK_D the op uses (SUPPORTED_HEAD_DIMS padded to a power of 2)
TABLE_DTYPES = (torch.bfloat16, torch.float32)
FULL_SPACE_BLOCK_D = (64,)
# The LGI stage shapes and layouts the compile test launches (fused-qkv self-attention, separate
# cross-attention tensors; lengths that are multiples of 16 and G == 1 specialise differently); a
# config's entry is the worst over them
SMALL_SPACE = {"packed": {(16, 16, 4), (32, 32, 4), (64, 64, 8)},  # (BLOCK_M, BLOCK_N, num_warps)
               "looped": {(16, 16), (32, 32), (64, 32), (64, 64)}}  # (BLOCK_M, BLOCK_N)
FIELDS = ("regs", "spill_stores", "spill_loads", "shared")  # order of the values in the table


def ck():
    """tests/helpers/compile_kernels.py, importable both as a package module and from the script."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.helpers.compile_kernels")


# --- what the table is keyed by ----------------------------------------------------------------------


def dtype_class(ptr_type: str) -> str:
    """Table dtype of a pointer signature type ('*bf16' -> '16bit', '*fp32' -> 'fp32')."""
    return "fp32" if ptr_type == "*fp32" else "16bit"


def table_key(kernel: str, constexprs: dict, ptr_type: str, num_warps: int, num_stages: int) -> tuple:
    """(kernel, PACK, dtype class, BLOCK_D, BLOCK_M, BLOCK_N, num_warps, num_stages); PACK None when n/a."""
    return (kernel.rsplit(".", 1)[-1], constexprs.get("PACK"), dtype_class(ptr_type), constexprs["BLOCK_D"],
            constexprs["BLOCK_M"], constexprs["BLOCK_N"], num_warps, num_stages)


def _jitted(obj) -> bool:
    return isinstance(obj, (JITFunction, InterpretedFunction))


def _source(obj) -> str:
    """A @triton.jit function's source from its def line, compiled or interpreted alike (= JITFunction.src)."""
    src = textwrap.dedent(inspect.getsource(obj.fn))
    return src[re.search(r"^def\s+\w+\s*\(", src, re.MULTILINE).start():]


def source_hash(fn) -> str:
    """sha256 of a kernel's source and of every @triton.jit function of its module it calls, transitively
    (not the line numbers: Triton's own cache_key changes when code above the kernel moves)."""
    module = sys.modules[fn.fn.__module__]
    jit = {name: f for name, f in vars(module).items() if _jitted(f)}
    seen, todo = {}, [fn]
    while todo:
        f = todo.pop()
        if f.fn.__name__ in seen:
            continue
        seen[f.fn.__name__] = _source(f)
        todo += [g for name, g in jit.items() if re.search(rf"\b{re.escape(name)}\s*\(", seen[f.fn.__name__])]
    return hashlib.sha256("\n".join(seen[k] for k in sorted(seen)).encode()).hexdigest()[:16]


def autotuned_kernels() -> dict:
    """The @triton.jit kernels behind the package's autotuners, by name."""
    ga = importlib.import_module("mae_kernels.grouped_attention")
    return {kernel.fn.__name__: kernel for kernel, _ in ga.TUNED_LAUNCHES.values()}


def fingerprint() -> dict:
    return {"triton": triton.__version__,
            "kernels": {name: source_hash(fn) for name, fn in sorted(autotuned_kernels().items())}}


# --- recording every config ----------------------------------------------------------------------------


def measured_here(config, named_args: dict) -> bool:
    """The measurement plan: every config of the static lists at BLOCK_D 64 (head dims 40 and 64, the
    LGI-Former's), a few at the other BLOCK_D; all within what the precision allows. What is not measured
    is not tuned (the prune keeps only measured, usable configs), so this plan is the autotune space."""
    ga = importlib.import_module("mae_kernels.grouped_attention")
    if not ga.precision_fits(config, named_args):
        return False
    if named_args["BLOCK_D"] in FULL_SPACE_BLOCK_D:
        return True
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    small = SMALL_SPACE["packed" if named_args["PACK"] else "looped"]
    return (bm, bn, config.num_warps) in small or (bm, bn) in small


def _record_all_configs(self: Autotuner, *args, **kwargs):
    """Stands in for Autotuner.run: one launch per config of the measurement plan (no shape pruning)."""
    named = {**dict(zip(self.arg_names, args)), **kwargs}
    if "PACK" not in named:  # the backward kernels: packed has its own kernel, dq/dkdv are looped
        named["PACK"] = "packed" in self.fn.fn.__name__
    for config in self.configs:
        if measured_here(config, named):
            self.fn.run(*args, **kwargs, **config.all_kwargs())


def record_table_jobs() -> list[dict]:
    c = ck()
    c._BACKEND = c.make_backend(c.TARGETS["sm_90"])
    mk = importlib.import_module("mae_kernels")
    JITFunction.run = c._record_launch
    Autotuner.run = _record_all_configs
    ga = importlib.import_module("mae_kernels.grouped_attention")
    ga.runs_triton = lambda name, *tensors: True  # the custom op's choice: Triton for CPU tensors, nothing launched
    for D in sorted(TABLE_HEAD_DIMS, key=lambda d: d != 64):  # the LGI-Former's head dim first
        for dtype in TABLE_DTYPES:
            for G, Lq, Lk in c.ATTENTION_SHAPES:
                q, k, v = c._attention_inputs(G, Lq, Lk, D, dtype)
                mk.grouped_attention(q, k, v).backward(torch.ones(2, G, Lq, 2, D, dtype=dtype))
    return list(c._jobs.values())


# --- compiling, with a cache and a per-compile timeout ---------------------------------------------------


def job_key(job: dict, target: str) -> str:
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    return json.dumps([job["signature"], job["constexprs"], job["attrs"], job["options"], job["name"],
                       source_hash(fn), target], sort_keys=True)


def _alarm(signum, frame):
    raise TimeoutError("compile took longer than --timeout")


def _compile_with_timeout(job: dict, target: str, timeout: int) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        return ck().compile_job(job, target)
    except TimeoutError as exc:  # raised inside ptxas' wait: subprocess.run kills ptxas
        return {"kernel": job["kernel"], "target": target, "ok": False, "timeout": True, "error": str(exc)}
    finally:
        signal.alarm(0)


def compile_cached(jobs: list[dict], targets, workers: int, cache: Path, timeout: int,
                   cached_only: bool = False) -> list[dict]:
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec["result"]
    todo = [(job, t) for job in jobs for t in targets if job_key(job, t) not in done]
    print(f"{len(jobs) * len(targets)} compiles, {len(todo)} not cached", file=sys.stderr, flush=True)
    if cached_only:
        return [{**done[job_key(job, t)], "job": job} for t in targets for job in jobs if job_key(job, t) in done]
    triton.knobs.nvidia.dump_ptxas_log = True
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool, cache.open("a") as out:
        futures = {pool.submit(_compile_with_timeout, job, t, timeout): (job, t) for job, t in todo}
        for i, fut in enumerate(concurrent.futures.as_completed(futures)):
            job, t = futures[fut]
            result = fut.result()
            done[job_key(job, t)] = result
            out.write(json.dumps({"key": job_key(job, t), "result": result}) + "\n")
            out.flush()
            if i % 20 == 0:
                print(f"{i}/{len(todo)}", file=sys.stderr, flush=True)
    return [{**done[job_key(job, t)], "job": job} for t in targets for job in jobs]


# --- the table -------------------------------------------------------------------------------------------


def table_rows(results: list[dict]) -> dict[tuple, dict[str, tuple]]:
    """table key -> {arch: (regs, spill stores, spill loads, shared)}, the maximum of each over the
    specialisations measured; None when one failed or timed out."""
    rows: dict[tuple, dict] = {}
    for r in results:
        job = r["job"]
        constexprs = {list(job["signature"])[k[0]]: v for k, v in job["constexprs"]}
        opts = job["options"]
        key = table_key(job["kernel"], constexprs, job["signature"]["q_ptr"], opts["num_warps"], opts["num_stages"])
        per_arch = rows.setdefault(key, {})
        value = tuple(r[f] for f in FIELDS) if r.get("ok") else None
        if r["target"] not in per_arch:
            per_arch[r["target"]] = value
        elif per_arch[r["target"]] is not None:  # the worst specialisation: most registers, spills, smem
            per_arch[r["target"]] = None if value is None else tuple(map(max, per_arch[r["target"]], value))
    return rows


def write_table(rows: dict, path: Path = TABLE_PATH) -> None:
    body = pprint.pformat(dict(sorted(rows.items(), key=lambda kv: [str(x) for x in kv[0]])), width=118,
                          sort_dicts=False)
    path.write_text(
        '"""Generated by tests/helpers/kernel_resources.py: do not edit; rerun it after changing a kernel.\n\n'
        "RESOURCES[(kernel, PACK, dtype class, BLOCK_D, BLOCK_M, BLOCK_N, num_warps, num_stages)][arch] =\n"
        f"    ({', '.join(FIELDS)}) of the compiled cubin (ptxas -v, Triton metadata); None: did not compile.\n"
        'FINGERPRINT: the kernel sources and triton version it was measured with.\n"""\n\n'
        f"FINGERPRINT = {pprint.pformat(fingerprint(), width=118)}\n\n"
        f"RESOURCES = {body}\n")


REPORT_FIELDS = ("kernel", "pack", "dtype", "block_d", "block_m", "block_n", "num_warps", "num_stages", "arch",
                 "regs", "spill_stores", "spill_loads", "shared", "blocks", "warps", "occupancy", "limiter", "usable")


def report_rows(rows: dict) -> list[list]:
    """One row (REPORT_FIELDS) per table entry and measured arch, assessed on that arch's limits."""
    out = []
    for key, per_arch in rows.items():
        for arch in MEASURED_ARCHS:
            res = per_arch.get(arch)
            if res is None:
                out.append([*key, arch, None, None, None, None, 0, 0, 0.0, "compile failed", False])
                continue
            a = assess(dict(zip(FIELDS, res)), key[6], arch)
            out.append([*key, arch, *res, a["blocks"], a["warps"], round(a["occupancy"], 4), a["limiter"],
                        a["usable"]])
    return out


def write_report_json(rows: dict, path: Path = REPORT_JSON) -> None:
    """benchmarks/report.py's input: one compact line per config and arch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in report_rows(rows)]
    path.write_text('{"fingerprint": ' + json.dumps(fingerprint()) + ',\n"fields": ' + json.dumps(REPORT_FIELDS)
                    + ',\n"rows": [\n' + ",\n".join(lines) + "\n]}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=90, help="seconds per compile before it counts as failed")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/kernel-resources.jsonl"))
    parser.add_argument("--table", type=Path, default=TABLE_PATH)
    parser.add_argument("--report-json", type=Path, default=REPORT_JSON)
    parser.add_argument("--cached-only", action="store_true", help="write what the cache holds, compile nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled")
    jobs = record_table_jobs()
    if not jobs:  # the recording no longer reaches the kernels (e.g. the dispatch changed): never write an empty table
        raise RuntimeError("recorded no kernel launch: check how record_table_jobs forces the Triton path")
    results = compile_cached(jobs, MEASURED_ARCHS, args.workers, args.cache, args.timeout, args.cached_only)
    rows = table_rows(results)
    write_table(rows, args.table)
    write_report_json(rows, args.report_json)
    print(f"wrote {args.table} and {args.report_json}", file=sys.stderr)


if __name__ == "__main__":
    main()
