"""Turn a pytest-benchmark JSON file into a markdown report and a bar chart of ratios.

    python -m benchmarks.report [--json PATH] [--out-dir benchmarks/results]

Without ``--json`` the newest ``*.json`` under ``.benchmarks/`` is used. Writes
``<device>-<YYYY-MM-DD>.md`` (machine, versions, commit, one table per benchmark group, headline
ratios, cases that produced no result, and the kernels' static resources: registers, spills, shared
memory and occupancy per kernel and config from ``--resources``) and ``<device>-<YYYY-MM-DD>.png`` (a
bar per ratio; only when the run has ratios).

How ratios are defined:

* Every case has a *role*: ``extra_info["role"]`` (or a ``role`` parameter), one of ``ours`` (this
  project's code), ``reference`` (our code with the kernels switched off), ``baseline`` (what a group
  is compared with) and ``peer`` (other people's code). Untagged cases are ``ours`` when their name
  mentions ``mae_kernels`` and ``peer`` otherwise, so any new benchmark file gets ratios.
* A group's *baseline* is its ``baseline`` case; without one, its fastest peer. Ratio = baseline
  median / case median, so > 1 means faster than the baseline. A group without a baseline (a single
  case, or only our own cases) gets no ratios, and says so.
* Headline, per ``ours`` case: the ratio to the baseline, to the best (fastest) of the baseline and
  peers, the FLOP ratio (baseline FLOPs / ours, from ``extra_info["flops_per_step"]``) and the
  kernels' share (the median of the same ``extra_info["model"]`` on the torch backend / ours).
* Cases whose test failed after timing are listed but never used as a baseline or for ratios.
  Skipped and failed cases come from ``avfmae_outcomes``, written by benchmarks/conftest.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

ROLES = ("ours", "reference", "baseline", "peer")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_RESOURCES = DEFAULT_OUT / "kernel-resources.json"  # written by tests/helpers/kernel_resources.py
# extra_info keys shown as table columns, in this order: key -> (header, format)
METRICS = {
    "samples_per_s": ("samples/s", "{:.2f}"),
    "clips_per_s": ("clips/s", "{:.1f}"),
    "clips_per_cpu_s": ("clips/CPU-s", "{:.1f}"),
    "GB/s": ("GB/s", "{:.1f}"),
    "TFLOP/s": ("TFLOP/s", "{:.3g}"),
    "flops_per_step": ("GFLOP/step", None),  # shown in GFLOP
    "params_M": ("params (M)", "{:.1f}"),
    "peak_mem_gb": ("peak mem (GiB)", "{:.2f}"),
    "host_syncs": ("host syncs", "{:d}"),
    "aten_ops": ("aten ops (eager)", "{:d}"),
    "launches": ("launches", "{:d}"),
    "launches_matmul": ("of which matmuls", "{:d}"),
    "optimizer_ms": ("optimizer (ms)", "{:.0f}"),
    "compile_s": ("compile (s)", "{:.0f}"),
}
PAPER_NOTE = ("Paper (Table 4): dual masking + improved LGI-Former pre-trains 1.46x faster than HiCMAE "
              "(Base, 100 epochs on VoxCeleb2-dev: 115.45 h vs 79.07 h), dual masking + vanilla LGI-Former "
              "1.49x (77.45 h); the comparable cases are `avfmae-table4` and `avfmae-vanilla` against `hicmae`.")
CPU_NOTE = ("CPU run: without CUDA the kernel cases run the torch reference (the Triton interpreter is "
            "never timed), so `avfmae` and `avfmae-torch` are the same computation and their ratio is "
            "noise; kernel-vs-peer ratios only check the harness. Model-level ratios (AVF-MAE++ vs "
            "HiCMAE) measure the algorithmic difference on this CPU. Peak memory is measured on CUDA only.")


@dataclass
class Case:
    group: str
    label: str
    fullname: str
    median: float | None      # seconds; None when the benchmark has no usable timing
    spread: float | None      # (max - min) / median: how noisy the rounds were
    role: str
    extra: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None  # the test's failure message when it failed after timing

    @property
    def usable(self) -> bool:
        return self.median is not None and self.failed is None


# --- reading ----------------------------------------------------------------------------------------


def newest_json(root: Path = Path(".benchmarks")) -> Path | None:
    """The most recently written ``*.json`` below ``root`` (pytest-benchmark's autosave folder)."""
    files = sorted(root.rglob("*.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return files[-1] if files else None


def load(path: Path) -> dict[str, Any]:
    """The JSON written by ``pytest --benchmark-json``; ValueError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--json: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise ValueError(f"--json: {path} is not a pytest-benchmark result (no 'benchmarks' list)")
    return data


def _role(bench: dict[str, Any]) -> str:
    role = (bench.get("extra_info") or {}).get("role") or (bench.get("params") or {}).get("role")
    if role is None:
        return "ours" if "mae_kernels" in bench.get("name", "") else "peer"
    if role not in ROLES:
        raise ValueError(f"benchmark {bench.get('name')!r}: role must be one of {ROLES}, got {role!r}")
    return role


def _timing(bench: dict[str, Any]) -> tuple[float | None, float | None]:
    """(median, (max - min) / median) of a benchmark's stats; (None, None) without a usable median."""
    stats = bench.get("stats") or {}
    median, lo, hi = stats.get("median"), stats.get("min"), stats.get("max")
    if not isinstance(median, int | float) or median <= 0:
        return None, None
    spread = (hi - lo) / median if isinstance(lo, int | float) and isinstance(hi, int | float) else None
    return float(median), spread


def parse_cases(data: dict[str, Any]) -> list[Case]:
    """Every timed case, in run order, marked failed when its test failed after the timing."""
    outcomes = data.get("avfmae_outcomes") or {}
    cases = []
    for bench in data.get("benchmarks", []):
        fullname = bench.get("fullname") or bench.get("name", "?")
        outcome = outcomes.get(fullname, {})
        median, spread = _timing(bench)
        cases.append(Case(group=bench.get("group") or "(no group)", label=bench.get("param") or bench.get("name", "?"),
                          fullname=fullname, median=median, spread=spread, role=_role(bench),
                          extra=dict(bench.get("extra_info") or {}),
                          failed=outcome.get("reason") if outcome.get("outcome") == "failed" else None))
    return cases


def group_cases(cases: Sequence[Case]) -> dict[str, list[Case]]:
    """Cases by group: end-to-end groups (those with FLOP counts) first, then in run order."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    end_to_end = {g for g, cs in groups.items() if any("flops_per_step" in c.extra for c in cs)}
    return dict(sorted(groups.items(), key=lambda item: item[0] not in end_to_end))


# --- ratios -----------------------------------------------------------------------------------------


def _fastest(cases: Sequence[Case]) -> Case | None:
    usable = [c for c in cases if c.usable]
    return min(usable, key=lambda c: c.median) if usable else None


def baseline_of(cases: Sequence[Case]) -> Case | None:
    """The group's ``baseline`` case, else its fastest peer, else None (see the module docstring)."""
    explicit = _fastest([c for c in cases if c.role == "baseline"])
    return explicit or _fastest([c for c in cases if c.role == "peer"])


def ratio(base: Case | None, case: Case | None) -> float | None:
    """base median / case median (> 1: ``case`` is faster); None when either lacks a usable timing."""
    if base is None or case is None or not (base.usable and case.usable):
        return None
    return base.median / case.median


def _kernels_partner(case: Case, cases: Sequence[Case]) -> Case | None:
    model = case.extra.get("model")
    if model is None:
        return None
    return _fastest([c for c in cases if c is not case and c.extra.get("model") == model
                     and c.role in ("reference", "baseline")])


def headline(groups: dict[str, list[Case]]) -> list[dict[str, Any]]:
    """One row per ``ours`` case that has something to compare with."""
    rows = []
    for group, cases in groups.items():
        base = baseline_of(cases)
        best_peer = _fastest([c for c in cases if c.role in ("baseline", "peer")])
        for case in (c for c in cases if c.role == "ours" and c.usable):
            partner = _kernels_partner(case, cases)
            flops = (base.extra.get("flops_per_step"), case.extra.get("flops_per_step")) if base else (None, None)
            row = {"group": group, "case": case, "baseline": base, "vs_baseline": ratio(base, case),
                   "best_peer": best_peer, "vs_best_peer": ratio(best_peer, case),
                   "flop_ratio": flops[0] / flops[1] if all(flops) else None,
                   "partner": partner, "kernels_share": ratio(partner, case)}
            if any(row[k] is not None for k in ("vs_baseline", "kernels_share")):
                rows.append(row)
    return rows


# --- rendering --------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(data: dict[str, Any]) -> str:
    info = data.get("machine_info") or {}
    return (info.get("avfmae") or {}).get("device") or "unknown-device"


def run_date(data: dict[str, Any]) -> str:
    stamp = str(data.get("datetime") or "")
    return stamp[:10] if re.match(r"\d{4}-\d{2}-\d{2}", stamp) else date.today().isoformat()


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _metric(key: str, value: Any) -> str:
    if not isinstance(value, int | float):
        return "–"
    if key == "flops_per_step":
        return f"{value / 1e9:.1f}"
    return METRICS[key][1].format(value)


def machine_section(data: dict[str, Any], source: str | None) -> list[str]:
    info = data.get("machine_info") or {}
    ours = info.get("avfmae") or {}
    commit = data.get("commit_info") or {}
    cpu = (info.get("cpu") or {}).get("brand_raw", "?")
    rev = (commit.get("id") or "unknown")[:12] + (" (dirty tree)" if commit.get("dirty") else "")
    rows = [("device", ours.get("device", "?")), ("CPU", f"{cpu}, {(info.get('cpu') or {}).get('count', '?')} cores"),
            ("torch", ours.get("torch")), ("triton", ours.get("triton")), ("CUDA", ours.get("cuda")),
            ("cuDNN", ours.get("cudnn")), ("DALI", ours.get("dali")), ("Python", info.get("python_version")),
            ("git commit", f"{rev} on {commit.get('branch', '?')}"), ("run at", data.get("datetime")),
            ("source", source)]
    return ["| | |", "|---|---|"] + [f"| {k} | {'–' if v is None else v} |" for k, v in rows]


def group_table(cases: Sequence[Case]) -> list[str]:
    base = baseline_of(cases)
    metrics = [k for k in METRICS if any(k in c.extra for c in cases)]
    header = ["case", "role", "median", "spread"] + [METRICS[k][0] for k in metrics] + ["ratio vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        name = f"**{case.label}**" if case is base else case.label
        if case.failed:
            name += f" (test failed: {case.failed})"
        spread = "–" if case.spread is None else f"{case.spread:.0%}"
        cells = [name, case.role, _seconds(case.median), spread] + [_metric(k, case.extra.get(k)) for k in metrics]
        lines.append("| " + " | ".join(cells + [_times(ratio(base, case))]) + " |")
    if base is None:
        lines.append("")
        lines.append("No baseline or peer in this group: no ratios.")
    else:
        lines.append("")
        lines.append(f"Baseline: **{base.label}** ({base.role}); ratio = its median / the case's median; "
                     "spread = (max - min) / median over the rounds.")
    return lines


def headline_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| group | ours | vs baseline | vs best peer | FLOP ratio (baseline / ours) | kernels' share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        def named(value, other):
            return _times(value) + (f" ({other.label})" if value is not None and other is not None else "")
        lines.append(f"| {r['group']} | {r['case'].label} | {named(r['vs_baseline'], r['baseline'])} | "
                     f"{named(r['vs_best_peer'], r['best_peer'])} | {_times(r['flop_ratio'])} | "
                     f"{named(r['kernels_share'], r['partner'])} |")
    return lines


def _size(value: Any, scale: float) -> str:
    return f"{value / scale:.1f}" if isinstance(value, int | float) else "–"


def peer_check(groups: dict[str, list[Case]]) -> list[str]:
    """Peers timed against an explicit baseline (e.g. HiCMAE's own code vs our HiCMAE baseline)."""
    lines = []
    for group, cases in groups.items():
        base = _fastest([c for c in cases if c.role == "baseline"])
        for peer in (c for c in cases if c.role == "peer" and c.usable and base is not None):
            sizes = [_size(c.extra.get(k), 1e9 if k == "flops_per_step" else 1.0)
                     for k in ("params_M", "flops_per_step") for c in (peer, base)]
            lines.append(f"| {group} | {peer.label} | {base.label} | {_times(ratio(base, peer))} | "
                         f"{sizes[0]} / {sizes[1]} | {sizes[2]} / {sizes[3]} |")
    if not lines:
        return []
    return (["### Peers against the baseline", "",
             "| group | peer | baseline | peer speed vs baseline | params (M) peer / baseline "
             "| GFLOP/step peer / baseline |",
             "|---|---|---|---|---|---|"] + lines + [""])


def data_loading_section(cases: Sequence[Case]) -> list[str]:
    """Data loaders by decoder and codec (cases with ``extra_info`` loader, codec and clips_per_s): wall-clock
    clips/s and clips per CPU-second side by side, which decoder wins on each codec, and ours against
    HiCMAE's own loader per CPU thread (the issue's goal: >= 2x)."""
    data = [c for c in cases if c.usable and {"loader", "codec", "clips_per_s"} <= c.extra.keys()]
    if not data:
        return []
    codecs = list(dict.fromkeys(c.extra["codec"] for c in data))
    loaders = list(dict.fromkeys(c.extra["loader"] for c in data))
    by = {(c.extra["loader"], c.extra["codec"]): c for c in data}
    header = ["loader", "decoder", "role"] + [f"{codec} {unit}" for codec in codecs
                                              for unit in ("clips/s", "clips/CPU-s")]
    lines = ["## Data loading: which decoder wins where", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for loader in loaders:
        some = next(c for (name, _), c in by.items() if name == loader)
        cells = [loader, str(some.extra.get("decoder", loader)), some.role]
        for codec in codecs:
            case = by.get((loader, codec))
            cells += [_metric(k, case.extra.get(k)) if case else "–" for k in ("clips_per_s", "clips_per_cpu_s")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for codec in codecs:
        here = [c for c in data if c.extra["codec"] == codec]
        fastest = max(here, key=lambda c: c.extra["clips_per_s"])
        line = f"- **{codec}**: fastest `{fastest.extra['loader']}` ({fastest.extra['clips_per_s']:.1f} clips/s)"
        costed = [c for c in here if isinstance(c.extra.get("clips_per_cpu_s"), int | float)]
        if costed:
            cheapest = max(costed, key=lambda c: c.extra["clips_per_cpu_s"])
            line += f"; cheapest per CPU-second `{cheapest.extra['loader']}` ({cheapest.extra['clips_per_cpu_s']:.1f})"
        ours = [c for c in here if c.role == "ours" and c.extra.get("device", "cpu") == "cpu"]
        hicmae = by.get(("hicmae", codec))
        if ours and hicmae is not None:
            key = "clips_per_cpu_s" if all("clips_per_cpu_s" in c.extra for c in (*ours, hicmae)) else "clips_per_s"
            best = max(ours, key=lambda c: c.extra[key])
            unit = "CPU-second" if key == "clips_per_cpu_s" else "thread"
            line += (f"; ours (`{best.extra['loader']}`) vs HiCMAE's loader per {unit}: "
                     f"{best.extra[key] / hicmae.extra[key]:.2f}x (goal >= 2x)")
        lines.append(line + ".")
    lines += ["", "clips/s is wall clock with the same thread count for every loader; clips/CPU-s counts the "
              "CPU time of the loader's process and workers, the per-clip cost, which a busy machine hardly "
              "moves. A dash: the loader cannot take that codec here, or its case was skipped.", ""]
    return lines


def outcomes_section(data: dict[str, Any]) -> list[str]:
    outcomes = data.get("avfmae_outcomes") or {}
    if not outcomes:
        return []
    lines = ["## Cases without results", "", "| case | outcome | reason |", "|---|---|---|"]
    for nodeid, item in outcomes.items():
        reason = str(item.get("reason", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {nodeid} | {item.get('outcome', '?')} | {reason} |")
    return lines + [""]


# (case, against, goal): the compiled step's targets (issue "one graph per step"); launches: at most
STEP_GOALS = (
    ("avfmae-table4-compiled", "hicmae-official", 1.46, "time"),
    ("avfmae-compiled", "hicmae-official", 1.2, "time"),
    ("avfmae-compiled", "hicmae-compiled", 1.3, "launches"),
)


def _model_only_ratio(base: Case | None, case: Case | None) -> float | None:
    """Like :func:`ratio`, with each case's optimizer update (``optimizer_ms``) taken out of its step time:
    AdamW's cost follows the parameter count, which the models' FLOPs and launches do not."""
    if ratio(base, case) is None or "optimizer_ms" not in base.extra or "optimizer_ms" not in case.extra:  # type: ignore[union-attr]
        return None
    spent = [c.median - c.extra["optimizer_ms"] / 1e3 for c in (base, case)]  # type: ignore[union-attr]
    return spent[0] / spent[1] if min(spent) > 0 else None


def step_goals(groups: dict[str, list[Case]]) -> list[str]:
    """Goals of the step groups, met or not, with the measured value (missing cases said so)."""
    lines = ["### Step goals", "", "| group | goal | measured | met |", "|---|---|---|---|"]
    for group, cases in groups.items():
        if not group.startswith("pretrain step"):
            continue
        by_label = {c.label.split("-", 1)[-1]: c for c in cases if c.usable}
        for ours, other, goal, kind in STEP_GOALS:
            a, b = by_label.get(ours), by_label.get(other)
            if kind == "time":
                text = f"{ours} ≥ {goal}x {other}"
                value = ratio(b, a)
                shown, met = _times(value), value is not None and value >= goal
                model_only = _model_only_ratio(b, a)
                if model_only is not None:
                    shown += f"; model alone (step − optimizer) {model_only:.2f}x"
            else:
                text = f"{ours} launches ≤ {goal}x {other}'s"
                counts = [c.extra.get("launches") if c else None for c in (a, b)]
                value = counts[0] / counts[1] if all(counts) else None
                shown = f"{value:.2f}x ({counts[0]} / {counts[1]})" if value is not None else "–"
                matmuls = [c.extra.get("launches_matmul") if c else None for c in (a, b)]
                if value is not None and all(matmuls):
                    shown += f"; matmuls alone {matmuls[0] / matmuls[1]:.2f}x ({matmuls[0]} / {matmuls[1]})"
                met = value is not None and value <= goal
            verdict = "yes" if met else ("not measured" if value is None else "no")
            lines.append(f"| {group} | {text} | {shown} | {verdict} |")
    return lines + [""]


def load_resources(path: Path | None) -> dict[str, Any] | None:
    """The kernel resource table tests/helpers/kernel_resources.py writes (None: no such file)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected the kernel-resources table") from err
    if not isinstance(data, dict) or "fields" not in data or "rows" not in data:
        raise ValueError(f"{path}: not a kernel-resources JSON (expected 'fields' and 'rows')")
    return data


def _kb(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1024:.1f}"


def resources_section(res: dict[str, Any]) -> list[str]:
    """Registers, spills, shared memory and occupancy per kernel and config (static: ptxas, no GPU run)."""
    rows = [dict(zip(res["fields"], r)) for r in res["rows"]]
    lines = ["## Kernel resources (static, sm_80 / sm_90 cubins)", "",
             "Measured without a GPU by `tests/helpers/kernel_resources.py`: registers and spills from `ptxas -v`, "
             "shared memory from Triton's metadata, occupancy = resident warps / 64 from registers, shared memory "
             "and warps per block (`mae_kernels.resources`); each config's worst over the LGI stage layouts. The "
             "autotuners only launch *usable* configs: they launch, never spill, stay under the register cap "
             "and keep the minimum occupancy. Kernel sources measured: "
             + ", ".join(f"`{k}` {v}" for k, v in res.get("fingerprint", {}).get("kernels", {}).items()) + ".", "",
             "| kernel | dtype | BLOCK_D | arch | configs | usable | spill | cannot launch | registers "
             "| max smem (KB) | best usable occupancy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[tuple, list[dict]] = {}
    for r in rows:
        kernel = r["kernel"] + ("" if r["pack"] is None else (" (packed)" if r["pack"] else " (looped)"))
        summary.setdefault((kernel, r["dtype"], r["block_d"], r["arch"]), []).append(r)
    for (kernel, dtype, block_d, arch), rs in summary.items():
        regs = [r["regs"] for r in rs if r["regs"] is not None]
        usable = [r for r in rs if r["usable"]]
        spill = sum(1 for r in rs if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0)
        no_launch = sum(1 for r in rs if r["blocks"] == 0)
        best = max((r["occupancy"] for r in usable), default=None)
        lines.append(f"| `{kernel}` | {dtype} | {block_d} | {arch} | {len(rs)} | {len(usable)} | {spill} | {no_launch} "
                     f"| {min(regs, default='–')}–{max(regs, default='–')} "
                     f"| {_kb(max((r['shared'] or 0 for r in rs), default=None))} "
                     f"| {'–' if best is None else f'{best:.0%}'} |")
    lines += ["", "<details><summary>Every config</summary>", "",
              "| kernel | pack | dtype | BLOCK_D | BLOCK_M | BLOCK_N | warps | stages | arch | registers "
              "| spill stores / loads (B) | smem (KB) | blocks/SM | occupancy | limited by | usable |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['kernel']}` | {r['pack']} | {r['dtype']} | {r['block_d']} | {r['block_m']} "
                     f"| {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['arch']} | {r['regs']} "
                     f"| {r['spill_stores']} / {r['spill_loads']} | {_kb(r['shared'])} | {r['blocks']} "
                     f"| {r['occupancy']:.0%} | {r['limiter']} | {'yes' if r['usable'] else '**no**'} |")
    return lines + ["", "</details>", ""]


def render_markdown(data: dict[str, Any], source: str | None = None, chart: str | None = None,
                    resources: dict[str, Any] | None = None) -> str:
    groups = group_cases(parse_cases(data))
    device = device_name(data)
    lines = [f"# Benchmarks on {device}, {run_date(data)}", ""] + machine_section(data, source) + [""]
    if device == "cpu":
        lines += [f"> {CPU_NOTE}", ""]
    tail = resources_section(resources) if resources else []
    if not groups:
        lines += ["**No benchmark results** in this file (every case was skipped or failed, or none ran).", ""]
        return "\n".join(lines + outcomes_section(data) + tail)
    rows = headline(groups)
    lines += ["## Headline ratios", ""]
    if rows:
        lines += headline_table(rows) + [""]
        lines += ["Ratios > 1 mean our case is faster. FLOP ratio > speedup: the implementation leaves "
                  "algorithmic savings on the table; < speedup: the kernels win beyond the FLOPs.", ""]
    else:
        lines += ["No group has both one of our cases and something to compare it with.", ""]
    lines += peer_check(groups)
    lines += data_loading_section([c for cases in groups.values() for c in cases])
    if any(g.startswith("pretrain step") for g in groups):
        lines += [PAPER_NOTE, ""] + step_goals(groups)
    if chart:
        lines += [f"![ratios vs each group's baseline]({chart})", ""]
    for group, cases in groups.items():
        lines += [f"## {group}", ""] + group_table(cases) + [""]
    return "\n".join(lines + outcomes_section(data) + tail)


def chart_bars(groups: dict[str, list[Case]]) -> list[tuple[str, float, str]]:
    """(label, ratio, role) per bar: every case against an explicit baseline; where the baseline is
    only the fastest peer, just our cases (peer-vs-peer ratios would crowd the chart)."""
    bars = []
    for group, cases in groups.items():
        base = baseline_of(cases)
        explicit = base is not None and base.role == "baseline"
        shown = [c for c in cases if c is not base and (explicit or c.role == "ours")]
        bars += [(group, c.label, value, c.role) for c in shown if (value := ratio(base, c)) is not None]
    # case ids usually repeat the group's parameters: prefix the group's first word (the op), or the
    # whole group name where that is still ambiguous
    short = [f"{group.split()[0]}: {label}" for group, label, _, _ in bars]
    return [(name if short.count(name) == 1 else f"{group}: {label}", value, role)
            for name, (group, label, value, role) in zip(short, bars)]


def render_chart(groups: dict[str, list[Case]], path: Path, title: str) -> bool:
    """Horizontal bars of ratios to each group's baseline; False (no file written) when there are none."""
    bars = chart_bars(groups)
    if not bars:
        return False
    try:
        import matplotlib
    except ImportError:  # optional (run_gpu.sh's image may lack it): the markdown carries every figure
        print("benchmarks.report: matplotlib is not installed, so no chart is drawn", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    colours = {"ours": "tab:green", "reference": "tab:olive", "baseline": "tab:gray", "peer": "tab:blue"}
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(bars)))
    labels, values, roles = zip(*reversed(bars))
    rows = range(len(bars))
    # bars grow from 1x, to the right for speedups and to the left for slowdowns
    ax.barh(rows, [v - 1.0 for v in values], left=1.0, color=[colours[r] for r in roles])
    for row, value in zip(rows, values):
        ax.text(value, row, f" {value:.2f}x ", va="center", ha="left" if value >= 1 else "right", fontsize=7)
    ax.set_yticks(rows, labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(min(values), 1.0) / 1.4, max(max(values), 1.0) * 1.4)
    times = FuncFormatter(lambda x, _: f"{x:g}x")
    ax.xaxis.set_major_formatter(times)
    lo, hi = ax.get_xlim()
    ax.xaxis.set_minor_formatter(times if hi / lo < 20 else NullFormatter())  # within ~a decade: label 2x, 3x...
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_xlabel("speedup over the group's baseline (log scale; > 1 is faster)")
    ax.legend(handles=[Patch(color=colours[r], label=r) for r in ROLES if r in roles], fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(data: dict[str, Any], out_dir: Path, source: str | None = None,
                 resources: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
    """Write the markdown (and the chart when there are ratios); return their paths."""
    groups = group_cases(parse_cases(data))  # validates before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(device_name(data))}-{run_date(data)}"
    png = out_dir / f"{stem}.png"
    has_chart = render_chart(groups, png, f"{device_name(data)}, {run_date(data)}")
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(data, source, png.name if has_chart else None, resources))
    return md, png if has_chart else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="pytest-benchmark JSON (default: newest under .benchmarks/)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})")
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES,
                        help=f"kernel resource JSON of tests/helpers/kernel_resources.py (default {DEFAULT_RESOURCES};"
                             " the section is left out when the file does not exist)")
    args = parser.parse_args(argv)
    source = args.json or newest_json()
    if source is None:
        parser.error("no --json given and no *.json under .benchmarks/; run "
                     "`pytest benchmarks --benchmark-only --benchmark-json PATH` first")
    if not Path(source).is_file():
        parser.error(f"--json: {source} does not exist")
    md, png = write_report(load(source), args.out_dir, str(source), load_resources(args.resources))
    print(f"wrote {md}" + (f" and {png}" if png else " (no ratios, no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
