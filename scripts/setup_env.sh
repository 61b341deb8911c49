#!/usr/bin/env bash
# Create .venv if it is missing and install the project into it with the given extras.
#   scripts/setup_env.sh dev,bench     (extras of pyproject.toml, comma-separated)
# Without an NVIDIA GPU the CPU build of torch is installed first (set TORCH_INDEX_URL to a CPU wheel
# index if your pip would otherwise pick a CUDA build); with a GPU, the normal build.
set -euo pipefail
extras="${1:-dev}"
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

stamp=".venv/.installed-${extras//,/-}-$(cat pyproject.toml | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing $torch_spec (CUDA build)"
    "${pip[@]}" "$torch_spec"
  else
    echo "setup: no NVIDIA GPU, installing $torch_spec (CPU build)"
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
  fi
fi
echo "setup: installing avfmae[$extras]"
"${pip[@]}" -e ".[$extras]"
touch "$stamp"
