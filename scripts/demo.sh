#!/usr/bin/env bash
# The README's main job. For now: run every kernel on its Triton path and its reference.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/kernel_smoke.py
