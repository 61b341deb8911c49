#!/usr/bin/env bash
# `pip install ARGS` into the project's venv without ever replacing its torch.
#   scripts/pip_keep_torch.sh -e ".[hicmae]"                       (setup_env.sh installs every extra this way)
#   scripts/pip_keep_torch.sh --dry-run --report r.json -e ".[hicmae]"   (what would be installed, changes nothing)
# VENV names the environment (default .venv).
#
# Every install runs under a generated pip constraints file holding the exact torch that is installed,
# build tag included (torch==2.13.0+cpu), and torchvision/torchaudio when they are installed. Packages
# built against torch pin it exactly (torchvision, torchaudio, xformers, flash-attn), so pip either
# takes their release built for this torch or stops; it cannot swap torch. The index torch came from
# (recorded by setup_env.sh) is searched too, so torchvision/torchaudio come in the same build as torch
# (the CPU wheels next to a CPU torch). When no release fits, this says which package wanted which torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "keep-torch: no Python at $py; run scripts/setup_env.sh first" >&2; exit 2; }

constraints="$(mktemp)" log="$(mktemp)"
trap 'rm -f "$constraints" "$log"' EXIT
# importlib.metadata only: importing torch would take seconds.
"$py" - "$constraints" <<'EOF'
import sys
from importlib import metadata

pins = []
for name in ("torch", "torchvision", "torchaudio"):
    try:
        pins.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        if name == "torch":
            sys.exit(f"keep-torch: torch is not installed in {sys.prefix}; run scripts/setup_env.sh first")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(pins) + "\n")
EOF
torch_pin="$(head -n1 "$constraints")"

if [ -f "$venv/avfmae-torch-index" ]; then index="$(cat "$venv/avfmae-torch-index")"; else index="${TORCH_INDEX_URL:-}"; fi

# --log keeps pip's full account (its conflict report included) whatever verbosity was asked for.
status=0
"$py" -m pip install --disable-pip-version-check --log "$log" --constraint "$constraints" \
  ${index:+--extra-index-url "$index"} "$@" || status=$?
[ "$status" -eq 0 ] && exit 0

# pip's conflict report lists each requirement on torch as "<package> <version> depends on torch<spec>";
# our own (avfmae's torch>=2.4) is not the culprit.
wanted="$(sed -E 's/^[0-9T:,-]+ //' "$log" | awk '/The conflict is caused by:/ {on = 1; next} on && !/^[[:space:]]/ {on = 0} on' |
          grep -E 'depends on (torch|torchvision|torchaudio)([^a-z_-]|$)' | grep -vE '^[[:space:]]*avfmae' |
          sed -E 's/^[[:space:]]+/    /' | sort -u || true)"
if [ -n "$wanted" ]; then
  cat >&2 <<EOF

keep-torch: not installed, nothing was changed. This environment keeps $torch_pin (the torch it was
set up with), and no release of what you asked for works with it:
$wanted
Pick a release of that package built for this torch, or set up a fresh environment for another torch:
    rm -rf $venv && TORCH_SPEC=torch==<version> make test
EOF
fi
exit "$status"
