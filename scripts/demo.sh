#!/usr/bin/env bash
# The README's main job: synthetic data -> pre-train `tiny` with DeepSpeed ZeRO-3 on CPU (2 processes)
# -> fine-tune on the synthetic labels -> print the validation accuracy. About 5 minutes on 2 cores.
#   DEMO_PROCS=2 (processes), DEMO_CLIPS=96 (clips; a third of them are the validation split).
set -euo pipefail
cd "$(dirname "$0")/.."
procs="${DEMO_PROCS:-2}"
clips="${DEMO_CLIPS:-96}"
classes=4
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# the CPU accelerator runs torch on every process; keep them from fighting over the cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ ! -f data/synthetic/val.csv ]; then
  echo "== demo 1/3: writing $clips synthetic clips ($classes classes) to data/synthetic"
  .venv/bin/python -m dali_pipelines.synthetic data/synthetic --clips "$clips" --classes "$classes" \
    --val-clips $((clips / 3))
fi

echo "== demo 2/3: pre-training tiny (ZeRO-3, $procs processes) -> runs/tiny_pretrain"
rm -rf runs/tiny_pretrain runs/tiny_finetune
.venv/bin/deepspeed --num_gpus "$procs" train.py --config ds_configs/tiny.json

echo "== demo 3/3: fine-tuning on the synthetic labels -> runs/tiny_finetune"
.venv/bin/deepspeed --num_gpus "$procs" train.py --config ds_configs/tiny_finetune.json

.venv/bin/python - "$classes" <<'PY'
import json, sys
classes = int(sys.argv[1])
best = json.load(open("runs/tiny_finetune/metrics.json"))["best"]
print(f"\nvalidation accuracy (WAR): {best['war']:.3f}  (UAR {best['uar']:.3f}, weighted F1 "
      f"{best['wa_f1']:.3f}); chance is {1 / classes:.3f}")
print("reconstructions after pre-training: runs/tiny_pretrain/reconstructions.png")
PY
