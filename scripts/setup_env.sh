#!/usr/bin/env bash
# Create .venv if it is missing and install the project into it with the given extras.
#   scripts/setup_env.sh dev,bench     (extras of pyproject.toml, comma-separated)
# Without an NVIDIA GPU the CPU build of torch is installed first (set TORCH_INDEX_URL to a CPU wheel
# index if your pip would otherwise pick a CUDA build); with a GPU, the normal build (or the one of
# TORCH_INDEX_URL). torch is installed once; every extra is then installed through
# scripts/pip_keep_torch.py, which keeps that torch: an extra that needs another one fails, saying which.
set -euo pipefail
extras="${1:-dev}"
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

# A misspelt extra would be installed as nothing by pip (a warning at most): refuse it here.
known="$(awk '/^\[/ {on = ($0 == "[project.optional-dependencies]"); next} on && /^[a-z0-9_-]+ *=/ {print $1}' pyproject.toml)"
for extra in ${extras//,/ }; do
  grep -qx -- "$extra" <<<"$known" || {
    echo "setup: no extra '$extra' in pyproject.toml; the extras are: $(echo $known | tr ' ' ,)" >&2; exit 2; }
done

[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=".venv/.installed-${extras//,/-}-$(sha1sum < pyproject.toml | cut -c1-12)"
[ -f "$stamp" ] && exit 0

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing $torch_spec (CUDA build)"
  else
    echo "setup: no NVIDIA GPU, installing $torch_spec (CPU build)"
  fi
  .venv/bin/python -m pip install --disable-pip-version-check -q \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
  # pip_keep_torch.py looks torchvision/torchaudio up there too, so their build matches torch's.
  printf '%s\n' "${TORCH_INDEX_URL:-}" > .venv/avfmae-torch-index
fi
echo "setup: installing avfmae[$extras] (keeping torch $(.venv/bin/python -c \
  'from importlib.metadata import version; print(version("torch"))'))"
.venv/bin/python scripts/pip_keep_torch.py -q -e ".[$extras]"
touch "$stamp"
