"""``pip install ARGS`` into the running interpreter's environment without ever replacing its torch.

    .venv/bin/python scripts/pip_keep_torch.py -e ".[hicmae]"        (setup_env.sh installs every extra so)
    .venv/bin/python scripts/pip_keep_torch.py --dry-run --report r.json -e ".[hicmae]"   (changes nothing)

Every install runs under a generated pip constraints file: the installed torch exactly, build tag
included (``torch==2.13.0+cpu``), and torchvision/torchaudio at the release made for that torch — the
installed one, else the one pip resolves next to the pinned torch. Packages compiled against torch pin
it exactly (torchvision, xformers), so pip takes their release for this torch or stops; it cannot swap
torch. A release that pins torch exactly is also tied to torch's build: next to a
``+cpu`` torch only a ``+cpu`` torchvision loads (the CUDA one fails at ``import torchvision``), so it
is pinned with torch's build tag and looked up on the index torch came from (recorded by
setup_env.sh, else $TORCH_INDEX_URL). When nothing fits, this says which package wanted which torch.
Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PEERS = ("torchvision", "torchaudio")  # released in lockstep with torch, resolved to the one made for it
INDEX_FILE = "avfmae-torch-index"  # in the venv, written by setup_env.sh: the index torch came from
PIP = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]


def torch_index_args() -> list[str]:
    recorded = Path(sys.prefix, INDEX_FILE)
    url = recorded.read_text().strip() if recorded.exists() else os.environ.get("TORCH_INDEX_URL", "")
    return ["--extra-index-url", url] if url else []


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def resolve(name: str, torch_pin: str) -> dict | None:
    """The report entry of the release of ``name`` pip picks next to ``torch_pin``, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report = Path(tmp, "c.txt"), Path(tmp, "report.json")
        constraints.write_text(torch_pin + "\n")
        done = subprocess.run([*PIP, "--dry-run", "-q", "--report", str(report), "-c", str(constraints),
                               *torch_index_args(), name], capture_output=True, text=True)
        if done.returncode:
            return None
        return next((item for item in json.loads(report.read_text())["install"]
                     if item["metadata"]["name"].lower() == name), None)


def constraints() -> tuple[list[str], list[str]]:
    """The pins (first: torch) and notes explaining pins no index can satisfy."""
    torch_version = installed("torch")
    if torch_version is None:
        sys.exit(f"keep-torch: torch is not installed in {sys.prefix}; run scripts/setup_env.sh first")
    pins, notes = [f"torch=={torch_version}"], []
    build = torch_version.partition("+")[2]
    for name in PEERS:
        version = installed(name)
        if version is None:
            entry = resolve(name, pins[0])
            if entry is None:  # no release for this torch: an extra needing one fails on the torch pin
                continue
            version = entry["metadata"]["version"]
            pins_torch = any(re.match(r"torch\s*\(?==", r) for r in entry["metadata"].get("requires_dist", []))
            if build and pins_torch and not version.endswith("+" + build):
                index = "https://download.pytorch.org/whl/" + build if build in ("cpu", "xpu") or \
                    build.startswith(("cu", "rocm")) else "<the wheel index of torch's build>"
                notes.append(f"{name}: its +{build} build, the one that loads next to torch {torch_version}, is on "
                             f"none of the indexes (only {version}, built for another torch). Set the environment "
                             f"up from the index that has it:\n    rm -rf .venv && TORCH_INDEX_URL={index} make test")
                version = f"{version.partition('+')[0]}+{build}"
        pins.append(f"{name}=={version}")
    return pins, notes


def culprits(pip_log: str) -> list[str]:
    """'<package> <version> depends on torch<spec>' lines of pip's conflict report, one per package."""
    lines, seen, on = [], set(), False
    for line in pip_log.splitlines():
        line = re.sub(r"^\S+,\d+ ", "", line)  # pip's log timestamps
        if "The conflict is caused by:" in line:
            on = True
        elif on and not line.startswith(" "):
            on = False
        elif on and (found := re.search(r"depends on (torch|torchvision|torchaudio)\b", line)):
            package = line.split()[0]
            # the project's own extras may name torchvision/torchaudio directly; its torch floor is no news
            own_torch = package.startswith("avfmae") and found.group(1) == "torch"
            if package not in seen and not own_torch:
                seen.add(package)
                lines.append(line.strip())
    return lines


def main(args: list[str]) -> int:
    pins, notes = constraints()
    with tempfile.TemporaryDirectory() as tmp:
        constraint_file, log = Path(tmp, "constraints.txt"), Path(tmp, "pip.log")
        constraint_file.write_text("\n".join(pins) + "\n")
        # --log keeps pip's whole account (its conflict report too) at any console verbosity.
        status = subprocess.run([*PIP, "--log", str(log), "-c", str(constraint_file), *torch_index_args(),
                                 *args]).returncode
        pip_log = log.read_text() if log.exists() else ""
    if status == 0:
        return 0
    wanted = culprits(pip_log)
    if wanted:
        blocked = [note for note in notes if any(f"depends on {note.split(':')[0]}" in w for w in wanted)]
        print(f"\nkeep-torch: not installed, nothing was changed. This environment keeps {pins[0]} (the torch it "
              "was set up with), and what you asked for needs:", *(f"    {w}" for w in wanted), sep="\n",
              file=sys.stderr)
        advice = blocked or ["Pick a release built for this torch, or set up a fresh environment for another "
                             "torch:\n    rm -rf .venv && TORCH_SPEC=torch==<version> make test"]
        print(*advice, sep="\n", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
