#!/usr/bin/env bash
# make test's pytest run. The compiler caches start empty, in a folder removed afterwards, so every run
# sees what a new machine sees: with a warm inductor cache, inductor skips code generation and a test can
# pass that fails on a fresh clone (issue 29). Both workers share the folder, as one machine would.
#   TEST_WORKERS=1        one process instead of two xdist workers (most tests run one thread: the Triton
#                         interpreter, launcher ranks waiting; two workers use both cores of a 2-core
#                         machine, and --dist loadfile keeps files whole so module fixtures are built once)
#   TEST_ORDER=reversed   run the test files in reversed order (order independence)
#   extra arguments go to pytest (e.g. a file, -k NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
caches="$(mktemp -d "${TMPDIR:-/tmp}/avfmae-test-caches.XXXXXX")"
trap 'rm -rf "$caches"' EXIT
export TORCHINDUCTOR_CACHE_DIR="$caches/inductor" TRITON_CACHE_DIR="$caches/triton"
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 \
  -n "${TEST_WORKERS:-2}" --dist loadfile --file-order "${TEST_ORDER:-forward}" "$@"
