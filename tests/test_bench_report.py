"""benchmarks/report.py: ratios, baselines, missing peers, empty and errored results, files written.

Synthetic pytest-benchmark JSON for the writer's rules, plus one real run of two tiny pre-training
step cases through pytest-benchmark and the report (the conftest hooks and the JSON format).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import avfmae
from benchmarks import report
from tests.helpers.subprocess_env import own_session_env

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


def bench(group, label, median, role=None, **extra):
    """One pytest-benchmark entry; median None writes an entry without stats (an errored benchmark)."""
    entry = {"group": group, "name": f"test_x[{label}]", "fullname": f"benchmarks/test_x.py::test_x[{label}]",
             "param": label, "params": {"case": label}, "extra_info": dict(extra, **({"role": role} if role else {}))}
    entry["stats"] = None if median is None else {"median": median, "min": median * 0.9, "max": median * 1.2}
    return entry


def run(benchmarks, outcomes=None, device=H100):
    return {"machine_info": {"python_version": "3.11.7", "cpu": {"brand_raw": "EPYC", "count": 16},
                             "avfmae": {"device": device, "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8"}},
            "commit_info": {"id": "0123456789abcdef0123", "dirty": False, "branch": "main"},
            "datetime": "2026-05-04T10:00:00+00:00", "benchmarks": benchmarks,
            "avfmae_outcomes": outcomes or {}}


def row(md, label):
    """The cells of the table row whose first cell names ``label`` (bold for the baseline)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].strip("*").split(" (test failed")[0] == label:
            return cells
    raise AssertionError(f"no row for {label!r} in:\n{md}")


STEP = "pretrain step base B=32"
STEP_CASES = [
    bench(STEP, "avfmae", 0.100, "ours", model="avfmae", flops_per_step=100e9, samples_per_s=320.0),
    bench(STEP, "avfmae-torch", 0.150, "reference", model="avfmae", flops_per_step=100e9),
    bench(STEP, "hicmae", 0.250, "baseline", model="hicmae", flops_per_step=150e9, params_M=99.6),
    bench(STEP, "hicmae-official", 0.400, "peer", model="hicmae-official", params_M=99.6),
]


def test_step_group_ratios_headline_and_files(tmp_path):
    md_path, png = report.write_report(run(STEP_CASES), tmp_path, "x.json")
    assert md_path.name == "nvidia-h100-80gb-hbm3-2026-05-04.md" and png == tmp_path / (md_path.stem + ".png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    md = md_path.read_text()
    assert f"![ratios vs each group's baseline]({png.name})" in md
    for label, ratio in (("avfmae", "2.50x"), ("avfmae-torch", "1.67x"), ("hicmae", "1.00x"),
                         ("hicmae-official", "0.62x")):
        assert row(md, label)[-1] == ratio, label
    assert row(md, "hicmae")[0] == "**hicmae**"          # the baseline is marked
    assert row(md, "avfmae")[2:4] == ["100 ms", "30%"]    # median, (max - min) / median
    assert "320.00" in row(md, "avfmae") and "150.0" in row(md, "hicmae")  # samples/s, GFLOP/step
    headline = row(md, STEP)
    assert headline[1:] == ["avfmae", "2.50x (hicmae)", "2.50x (hicmae)", "1.50x", "1.50x (avfmae-torch)"]
    assert f"| {STEP} | hicmae-official | hicmae | 0.62x | 99.6 / 99.6 | – / 150.0 |" in md  # peer check
    assert "Paper (Table 4)" in md and "| torch | 2.13.0 |" in md and "0123456789ab on main" in md


def test_without_matplotlib_the_markdown_is_written_without_a_chart(tmp_path, monkeypatch):
    # run_gpu.sh promises matplotlib is optional: a GPU image without it must still get its report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    md_path, png = report.write_report(run(STEP_CASES), tmp_path, "x.json")
    md = md_path.read_text()
    assert png is None and list(tmp_path.glob("*.png")) == [] and "![" not in md
    assert row(md, "avfmae")[-1] == "2.50x"


def test_step_goals_show_time_launch_and_matmul_ratios_and_the_model_alone(tmp_path):
    group = "pretrain step base B=2"
    cases = [bench(group, "base-avfmae-compiled", 2.0, "ours", launches=1800, launches_matmul=1000, optimizer_ms=700.0),
             bench(group, "base-avfmae-table4-compiled", 1.5, "ours", optimizer_ms=600.0),
             bench(group, "base-hicmae-compiled", 1.6, "reference", launches=900, launches_matmul=500),
             bench(group, "base-hicmae-official", 1.8, "peer", optimizer_ms=300.0),
             bench(group, "base-hicmae", 1.9, "baseline")]
    md = report.write_report(run(cases), tmp_path)[0].read_text()
    goals = {tuple(line.split(" | ")[1:3]): line for line in md.splitlines()
             if line.startswith(f"| {group} |") and (" ≥ " in line or " ≤ " in line)}
    table4 = goals["avfmae-table4-compiled ≥ 1.46x hicmae-official", "1.20x; model alone (step − optimizer) 1.67x"]
    assert table4.endswith("| no |")                             # 1.8 / 1.5 s; (1.8 - 0.3) / (1.5 - 0.6)
    assert ("avfmae-compiled ≥ 1.2x hicmae-official", "0.90x; model alone (step − optimizer) 1.15x") in goals
    assert ("avfmae-compiled launches ≤ 1.3x hicmae-compiled's",
            "2.00x (1800 / 900); matmuls alone 2.00x (1000 / 500)") in goals
    assert row(md, "base-avfmae-compiled")[-4:-1] == ["1800", "1000", "700"]   # launches, matmuls, optimizer (ms)


def data_case(loader, codec, clips_per_s, clips_per_cpu_s, role):
    return bench(f"data loading {codec}", f"{loader}-{codec}", 32 / clips_per_s, role, loader=loader, codec=codec,
                 decoder=loader.upper(), clips_per_s=clips_per_s, clips_per_cpu_s=clips_per_cpu_s, threads=2)


def test_data_loading_table_names_the_winner_per_codec_and_ours_vs_hicmae(tmp_path):
    cases = [data_case("dali-cpu", "vp9", 10.0, 40.0, "ours"), data_case("dali-torchcodec", "vp9", 12.0, 36.0, "ours"),
             data_case("pyav", "vp9", 9.0, 20.0, "baseline"), data_case("hicmae", "vp9", 6.0, 16.0, "peer"),
             data_case("dali-torchcodec", "h264", 20.0, 50.0, "ours"), data_case("pyav", "h264", 8.0, 24.0, "baseline"),
             data_case("hicmae", "h264", 8.0, 25.0, "peer")]
    md = report.write_report(run(cases, device="cpu"), tmp_path)[0].read_text()
    assert "## Data loading: which decoder wins where" in md
    assert row(md, "dali-cpu")[1:] == ["DALI-CPU", "ours", "10.0", "40.0", "–", "–"]  # DALI's CPU decoder: no H.264
    assert row(md, "dali-torchcodec")[3:] == ["12.0", "36.0", "20.0", "50.0"]
    assert row(md, "hicmae")[3:] == ["6.0", "16.0", "8.0", "25.0"]
    assert ("- **vp9**: fastest `dali-torchcodec` (12.0 clips/s); cheapest per CPU-second `dali-cpu` (40.0); "
            "ours (`dali-cpu`) vs HiCMAE's loader per CPU-second: 2.50x (goal >= 2x).") in md
    assert "- **h264**: fastest `dali-torchcodec` (20.0 clips/s)" in md and "per CPU-second: 2.00x" in md
    assert "Data loading" not in report.render_markdown(run(STEP_CASES))  # only where data cases ran


def test_untagged_group_uses_its_fastest_peer_and_a_group_without_peers_gets_no_ratio(tmp_path):
    attention = "attention L=100"  # written without roles, like a new benchmark file would be
    cases = [bench(attention, "mae_kernels", 1e-3), bench(attention, "sdpa", 2e-3), bench(attention, "flex", 4e-3),
             bench("lonely op", "mae_kernels", 5e-6)]
    groups = report.group_cases(report.parse_cases(run(cases)))
    assert [c.role for c in groups[attention]] == ["ours", "peer", "peer"]
    assert report.baseline_of(groups[attention]).label == "sdpa"
    assert report.baseline_of(groups["lonely op"]) is None
    md_path, png = report.write_report(run(cases), tmp_path)
    md = md_path.read_text()
    assert row(md, "sdpa")[0] == "**sdpa**" and row(md, "mae_kernels")[-1] == "2.00x" and row(md, "flex")[-1] == "0.50x"
    lonely = md.split("## lonely op")[1]
    assert "No baseline or peer in this group: no ratios." in lonely
    assert row(lonely, "mae_kernels")[2:] == ["5 µs", "30%", "–"]
    assert [r["group"] for r in report.headline(groups)] == [attention]
    assert png is not None and png.exists()


def test_errored_and_failed_cases_are_listed_but_never_compared(tmp_path):
    failed_base = "benchmarks/test_x.py::test_x[hicmae]"
    outcomes = {failed_base: {"outcome": "failed", "reason": "AssertionError: loss is nan"},
                "benchmarks/test_x.py::test_x[huge-avfmae]": {"outcome": "failed", "reason": "CUDA out of memory"},
                "benchmarks/test_x.py::test_x[hicmae-official]": {"outcome": "skipped", "reason": "no --hicmae-path"}}
    cases = [bench(STEP, "avfmae", 0.1, "ours"), bench(STEP, "hicmae", 0.05, "baseline"),
             bench(STEP, "peer-a", 0.3, "peer"), bench(STEP, "no-stats", None, "peer")]
    md = report.render_markdown(run(cases, outcomes))
    # the failed baseline is shown but the fastest *usable* peer takes its place
    assert row(md, "hicmae")[0] == "hicmae (test failed: AssertionError: loss is nan)" and row(md, "hicmae")[-1] == "–"
    assert row(md, "peer-a")[0] == "**peer-a**" and row(md, "avfmae")[-1] == "3.00x"
    assert row(md, "no-stats")[2:] == ["–", "–", "–"]
    section = md.split("## Cases without results")[1]
    assert "| benchmarks/test_x.py::test_x[huge-avfmae] | failed | CUDA out of memory |" in section
    assert "| benchmarks/test_x.py::test_x[hicmae-official] | skipped | no --hicmae-path |" in section


def test_empty_results_write_a_report_that_says_so(tmp_path):
    outcomes = {"benchmarks/test_x.py::test_x[a]": {"outcome": "skipped", "reason": "needs CUDA"}}
    md_path, png = report.write_report(run([], outcomes, device="cpu"), tmp_path)
    md = md_path.read_text()
    assert md_path.name == "cpu-2026-05-04.md" and png is None and not list(tmp_path.glob("*.png"))
    assert "**No benchmark results**" in md and "## Headline" not in md
    assert "| benchmarks/test_x.py::test_x[a] | skipped | needs CUDA |" in md
    assert "CPU run:" in md  # the note that CPU kernel cases run the torch reference


def test_cli_reads_the_newest_json_and_rejects_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report.main([])
    assert exit_info.value.code == 2 and "no --json given" in capsys.readouterr().err
    old, new = tmp_path / ".benchmarks" / "a" / "0001.json", tmp_path / ".benchmarks" / "b" / "0002.json"
    for path, device, stamp in ((old, "cpu", 1_000_000), (new, H100, 2_000_000)):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(run(STEP_CASES, device=device)))
        os.utime(path, (stamp, stamp))
    assert report.main(["--out-dir", "out"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "nvidia-h100-80gb-hbm3-2026-05-04.md", "nvidia-h100-80gb-hbm3-2026-05-04.png"]
    (tmp_path / "bad.json").write_text('{"benchmarks": 3}')
    with pytest.raises(ValueError, match="bad.json is not a pytest-benchmark result"):
        report.main(["--json", "bad.json", "--out-dir", "rejected"])
    (tmp_path / "roles.json").write_text(json.dumps(run([bench("g", "x", 1.0, "winner")])))
    with pytest.raises(ValueError, match="role must be one of"):
        report.main(["--json", "roles.json", "--out-dir", "rejected"])
    assert not (tmp_path / "rejected").exists()


@pytest.mark.slow
def test_real_step_benchmark_run_through_the_report(tmp_path):
    """Two tiny step cases and the (skipped) HiCMAE peer, run by pytest-benchmark, then the report."""
    ids = ["tiny-avfmae", "tiny-hicmae", "tiny-hicmae-official"]
    out = tmp_path / "run.json"
    env = own_session_env(BENCH_STEP_ROUNDS="2", HICMAE_PATH="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}"] + [f"benchmarks/test_bench_step.py::test_pretrain_step[{i}]" for i in ids]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["avfmae"]["torch"] == torch.__version__
    skipped = data["avfmae_outcomes"][f"benchmarks/test_bench_step.py::test_pretrain_step[{ids[2]}]"]
    assert skipped["outcome"] == "skipped" and "--hicmae-path" in skipped["reason"]
    timed = {b["param"]: b for b in data["benchmarks"]}
    assert set(timed) == set(ids[:2])
    for b in timed.values():
        info, median = b["extra_info"], b["stats"]["median"]
        assert info["flops_per_step"] > 1e9 and info["samples_per_s"] == pytest.approx(2 / median, rel=1e-3)
        assert info["TFLOP/s"] == pytest.approx(info["flops_per_step"] / median / 1e12, rel=1e-2, abs=1e-4)
        assert 0 < info["launches_matmul"] < info["launches"] and 0 < info["optimizer_ms"] < median * 1e3
    # params_M reports the timed model: count the same models' parameters here (meta device: no memory)
    for label, task in (("tiny-avfmae", "pretrain"), ("tiny-hicmae", "hicmae_pretrain")):
        with torch.device("meta"):
            counted = sum(p.numel() for p in avfmae.build_model("tiny", task).parameters())
        assert timed[label]["extra_info"]["params_M"] == pytest.approx(counted / 1e6, abs=0.005), label
    assert timed["tiny-hicmae"]["extra_info"]["params_M"] < timed["tiny-avfmae"]["extra_info"]["params_M"]
    md_path, png = report.write_report(data, tmp_path)
    expected = timed["tiny-hicmae"]["stats"]["median"] / timed["tiny-avfmae"]["stats"]["median"]
    assert row(md_path.read_text(), "tiny-avfmae")[-1] == f"{expected:.2f}x"
    assert png is not None and "tiny-hicmae-official" in md_path.read_text()


@pytest.mark.slow
def test_plain_benchmark_run_writes_its_own_report(tmp_path):
    """`pytest benchmarks --benchmark-only` with no --benchmark-json still leaves JSON and report behind."""
    env = own_session_env(BENCH_REPORT_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           "benchmarks/test_bench_tokens.py", "-k", "gather"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1 and f"benchmark report: {reports[0]}" in proc.stdout
    text = reports[0].read_text()
    assert "gather_tokens video C=512" in text and "assemble_decoder_tokens" not in text


def test_kernel_resource_section_lists_every_config_and_summarises_per_kernel(tmp_path):
    fields = ["kernel", "pack", "dtype", "block_d", "block_m", "block_n", "num_warps", "num_stages", "arch", "regs",
              "spill_stores", "spill_loads", "shared", "blocks", "warps", "occupancy", "limiter", "usable"]
    rows = [["_attn_fwd_kernel", True, "16bit", 64, 16, 16, 4, 1, "sm_90", 96, 0, 0, 4096, 5, 20, 0.3125,
             "registers", True],
            ["_attn_fwd_kernel", True, "16bit", 64, 128, 128, 4, 1, "sm_90", 255, 40, 48, 65536, 2, 8, 0.125,
             "registers", False],
            ["_attn_fwd_kernel", True, "16bit", 64, 64, 64, 8, 1, "sm_90", None, None, None, None, 0, 0, 0.0,
             "compile failed", False]]
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"fingerprint": {"kernels": {"_attn_fwd_kernel": "abc"}}, "fields": fields,
                                "rows": rows}))
    md_path, _ = report.write_report(run(STEP_CASES), tmp_path, resources=report.load_resources(path))
    md = md_path.read_text()
    assert "## Kernel resources" in md and "`_attn_fwd_kernel` abc" in md
    assert row(md, "`_attn_fwd_kernel (packed)`") == [
        "`_attn_fwd_kernel (packed)`", "16bit", "64", "sm_90", "3", "1", "1", "1", "96–255", "64.0", "31%"]
    assert row(md, "`_attn_fwd_kernel`")[:13] == [  # first per-config row
        "`_attn_fwd_kernel`", "True", "16bit", "64", "16", "16", "4", "1", "sm_90", "96", "0 / 0", "4.0", "5"]
    assert "| 40 / 48 | 64.0 | 2 | 12% | registers | **no** |" in md
    assert report.load_resources(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a kernel-resources JSON"):
        report.load_resources(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        report.load_resources(tmp_path / "bad.json")


def test_committed_kernel_resources_render():
    """The JSON tests/helpers/kernel_resources.py wrote renders, and agrees with the table the kernels use."""
    from mae_kernels._resource_table import FINGERPRINT

    res = report.load_resources(report.DEFAULT_RESOURCES)
    assert res is not None and res["fingerprint"] == FINGERPRINT
    lines = report.resources_section(res)
    assert sum(1 for line in lines if line.startswith("| `_attn")) > 100
