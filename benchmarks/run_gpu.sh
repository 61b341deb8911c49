#!/usr/bin/env bash
# The GPU run, in one call: kernel and model tests on CUDA, the sync check, the step benchmarks
# (eager / compiled / CUDA graph), the kernel benchmarks, and a report of each benchmark run. Made for
# one H100/H200 with no network, on what a bare GPU image holds (Python 3.12, a CUDA torch, triton,
# einops, timm, pytest, pytest-benchmark, hypothesis): nothing is installed and nothing downloaded; this
# checkout is put on PYTHONPATH (kernels/ as mae_kernels). DALI, DeepSpeed and matplotlib are optional
# (their cases skip).
#
#   benchmarks/run_gpu.sh                          # everything, under 8 minutes (limits: STAGE_*_S)
#   OUT_DIR=$OUT benchmarks/run_gpu.sh             # results somewhere else (default benchmarks/results)
#   RUN_GPU_STAGES=tests,sync benchmarks/run_gpu.sh   # some stages only: tests, sync, step, kernels, report
#
# Environment (all optional):
#   HICMAE_PATH        HiCMAE checkout: also time HiCMAE's own model (needs timm). Without network, bring
#                      its *.py files along, e.g. in .peers/hicmae (git ignores .peers/; under 1 MB, seen
#                      running with torch 2.11 and timm 1.0.31) and set HICMAE_PATH=.peers/hicmae
#   BENCH_STEP_SIZES   sizes of the step cases, default base,huge
#   BENCH_STEP_BATCH   per-size batch, default base=32,huge=8
#   BENCH_STEP_CASES   step cases, default: eager, compiled and CUDA-graph AVF-MAE++ / Table 4 / HiCMAE
#   STAGE_TESTS_S, STAGE_SYNC_S, STAGE_STEP_S, STAGE_KERNELS_S   time limit of each stage (seconds)
#   RUN_GPU_ON_CPU=1   run the plumbing on a CPU machine (tiny sizes; what tests/test_run_gpu.py does)
#
# Every stage writes its own file under OUT_DIR (step-<time>.json, kernels-<time>.json); the report stage
# turns each JSON this call wrote into <device>-<date>.md, the step's in OUT_DIR and the kernels' in
# OUT_DIR/kernels (same file name). A stage that fails or runs out of time is recorded (summary.txt)
# and the next one still runs, so one call always brings back a report.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
out="${OUT_DIR:-benchmarks/results}"
stages=",${RUN_GPU_STAGES:-tests,sync,step,kernels,report},"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"

shim="$(mktemp -d)"
ln -s "$repo/kernels" "$shim/mae_kernels"
export PYTHONPATH="$shim:$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 MAE_KERNELS_BACKEND=auto

if [ "${RUN_GPU_ON_CPU:-0}" = 1 ]; then
  export MAE_KERNELS_BACKEND=torch BENCH_STEP_SIZES="${BENCH_STEP_SIZES:-tiny}" BENCH_STEP_BATCH="${BENCH_STEP_BATCH:-2}"
  export BENCH_STEP_ROUNDS="${BENCH_STEP_ROUNDS:-1}" BENCH_STEP_CASES="${BENCH_STEP_CASES:-avfmae,hicmae}"
  sync_size=tiny
  stages=",${RUN_GPU_STAGES:-tests,sync,step,kernels,report},"
  tests=(tests/test_step_syncs.py -k "counter or validate")
  step_select=()
  kernels_select=(-k "audio and not huge and (mae_kernels or mae_way or sdpa-math)")  # a sample: CPU seconds
  # the limits below are the GPU's 8-minute budget; a loaded 2-core CPU needs several times that
  : "${STAGE_TESTS_S:=150}" "${STAGE_SYNC_S:=240}" "${STAGE_STEP_S:=360}" "${STAGE_KERNELS_S:=120}"
else
  unset TRITON_INTERPRET  # compiled kernels only: the interpreter is a correctness tool
  "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    'run_gpu.sh: torch sees no CUDA device (RUN_GPU_ON_CPU=1 runs the plumbing on a CPU)')" || exit 1
  export BENCH_STEP_SIZES="${BENCH_STEP_SIZES:-base,huge}" BENCH_STEP_BATCH="${BENCH_STEP_BATCH:-base=32,huge=8}"
  export BENCH_STEP_CASES="${BENCH_STEP_CASES:-avfmae,avfmae-table4,hicmae,avfmae-compiled,avfmae-table4-compiled,hicmae-compiled,avfmae-cudagraph,hicmae-cudagraph,hicmae-official}"
  sync_size=base
  step_select=(-k "not (huge and (compiled or cudagraph))")  # compiling huge would not fit the budget
  # not the xformers and flash-attn libraries' cases, so the stage's time does not depend on what the
  # image holds ("flash-attn": plain "flash" would drop torch's own sdpa-flash too)
  kernels_select=(-k "not xformers and not flash-attn")
  # kernels in bf16/fp16/fp32 with full autotuning, the ops' registration, the sync-free step, and the
  # model on the Triton kernels against the reference
  tests=(tests/test_token_kernels.py tests/test_masked_mse_loss.py tests/test_grouped_attention.py
         tests/test_custom_ops.py tests/test_step_syncs.py tests/test_model_pretrain.py)
fi
"$py" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
  '| torch', torch.__version__, '| cuda', torch.version.cuda)" | tee -a "$summary"

stage() {  # stage NAME LIMIT_S COMMAND...: run, time-limited, and record the outcome
  local name="$1" limit="$2"; shift 2
  case "$stages" in *",$name,"*) ;; *) return 0 ;; esac
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local verdict=$([ $rc = 0 ] && echo ok || { [ $rc = 124 ] && echo "timed out after ${limit}s" || echo "failed (exit $rc)"; })
  echo "stage $name: $verdict in $((SECONDS - start))s; tail of $out/$name.log:" | tee -a "$summary"
  tail -n 4 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
}

stamp="$(date -u +%Y%m%dT%H%M%SZ)"  # in the JSON names: the report takes this call's, never an old one
json="$out/step-$stamp.json" kernels_json="$out/kernels-$stamp.json"
peer=()
if [ -n "${HICMAE_PATH:-}" ]; then peer=(--hicmae-path "$HICMAE_PATH"); fi

# not -x: a device is lent rarely, so one run should show every failure, not the first one
stage tests "${STAGE_TESTS_S:-180}" "$py" -m pytest "${tests[@]}" -q --maxfail=25 -p no:cacheprovider -rs \
  --junitxml="$out/tests.xml"
stage sync "${STAGE_SYNC_S:-60}" "$py" -m benchmarks.gpu_checks --size "$sync_size" --out "$out/sync-check.json"
stage step "${STAGE_STEP_S:-170}" "$py" -m pytest benchmarks/test_bench_step.py --benchmark-only -q -rs \
  -p no:cacheprovider --benchmark-json "$json" ${step_select[@]+"${step_select[@]}"} ${peer[@]+"${peer[@]}"}
stage kernels "${STAGE_KERNELS_S:-40}" "$py" -m pytest benchmarks/test_bench_attention.py \
  benchmarks/test_bench_tokens.py --benchmark-only -q -rs -p no:cacheprovider "${kernels_select[@]}" \
  --benchmark-json "$kernels_json"
report_args=()  # JSON and folder of each report: both are named <device>-<date>.md
[ -f "$json" ] && report_args+=("$json" "$out")
[ -f "$kernels_json" ] && report_args+=("$kernels_json" "$out/kernels")
# one stage, one limit: a report takes seconds, and the stage limits must add up to under 8 minutes
[ ${#report_args[@]} -gt 0 ] && stage report 20 bash -c 'py="$1" rc=0; shift
  while [ $# -gt 0 ]; do "$py" -m benchmarks.report --json "$1" --out-dir "$2" || rc=$?; shift 2; done
  exit $rc' report "$py" "${report_args[@]}"
rm -rf "$shim"
echo "results in $out (summary: $summary)"
! grep -q "^stage .*: \(failed\|timed out\)" "$summary"
