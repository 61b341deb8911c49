#!/usr/bin/env bash
# The whole benchmark suite on one CUDA GPU with no network, then the report.
#
#   benchmarks/run_gpu.sh                 # everything: step (base/large/huge), kernels, attention, data
#   benchmarks/run_gpu.sh -m step         # extra arguments go to pytest (here: the training step only)
#
# Nothing below downloads anything. Prepare while the machine still has network (or copy a prepared
# .venv, or install from a wheel folder with PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels):
#   scripts/setup_env.sh dev,bench,data   # CUDA torch, triton, pytest(-benchmark), matplotlib, DALI, PyAV
#   .venv/bin/pip install -e '.[peers]'   # optional: xformers and flash-attn, the attention peers
#   .venv/bin/pip install -e '.[hicmae]'  # optional, with HiCMAE: its code imports timm (needs torchvision)
#   git clone https://github.com/sunlicai/HiCMAE /somewhere/HiCMAE   # optional: then HICMAE_PATH=...
#
# Environment (all optional):
#   HICMAE_PATH        HiCMAE checkout: also time HiCMAE's own model (skipped, with the reason, without)
#   BENCH_STEP_SIZES   model sizes of the training-step cases, default base,large,huge
#   BENCH_STEP_BATCH   per-size batch, default base=32,large=16,huge=8 (lower it on cards under 40 GB)
#   BENCH_STEP_ROUNDS  timed steps per case, default 10
#   OUT_DIR            where the report goes, default benchmarks/results
#
# Duration: an estimate until the first GPU run replaces it — about 15 minutes on one H100: building
# the large/huge models and the first (autotuning) step of each dominate the 5-6 step cases per size;
# the kernel, attention and data cases take a few minutes more. The largest case in memory is the
# HiCMAE baseline at huge (its decoders attend over all 800 + 128 tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
unset TRITON_INTERPRET  # compiled kernels only: the interpreter is a correctness tool, never timed

"$py" - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: torch sees no CUDA device (on a CPU machine use `make bench`)")
print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

export BENCH_STEP_SIZES="${BENCH_STEP_SIZES:-base,large,huge}"
export BENCH_STEP_BATCH="${BENCH_STEP_BATCH:-base=32,large=16,huge=8}"
export HF_HUB_OFFLINE=1  # timm (HiCMAE peer) must not try to reach the Hugging Face hub
mkdir -p .benchmarks
json=".benchmarks/gpu-$(date -u +%Y%m%dT%H%M%SZ).json"
peer=()
if [ -n "${HICMAE_PATH:-}" ]; then peer=(--hicmae-path "$HICMAE_PATH"); fi

"$py" -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider --benchmark-json "$json" \
  ${peer[@]+"${peer[@]}"} "$@"
status=$?
# the report lists failed and skipped cases too, so write it even when some case failed
"$py" -m benchmarks.report --json "$json" --out-dir "${OUT_DIR:-benchmarks/results}" || exit 1
exit "$status"
