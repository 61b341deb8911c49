# The two commands of the README. Each creates .venv if missing and installs what it needs.
# Optional extras go through the same script, which never replaces the installed torch:
#   make extra EXTRAS=hicmae          add extras (comma-separated) to .venv
#   make bench HICMAE_PATH=/path      also installs `hicmae` and times HiCMAE's own model
.PHONY: demo test bench extra

comma := ,
TEST_EXTRAS := dev,bench,data,train
# test processes: most tests run one thread (the Triton interpreter, launcher ranks waiting), so two
# workers on a 2-core machine use both cores; files stay whole so module fixtures are built once.
# TEST_ORDER=reversed runs the files in reversed order. Compiler caches start empty (scripts/run_tests.sh).
TEST_WORKERS ?= 2
TEST_ORDER ?= forward
DEMO_EXTRAS := data,train
BENCH_EXTRAS := $(TEST_EXTRAS)$(if $(HICMAE_PATH),$(comma)hicmae)

demo:
	@scripts/setup_env.sh $(DEMO_EXTRAS)
	@scripts/demo.sh

test:
	@scripts/setup_env.sh $(TEST_EXTRAS)
	.venv/bin/python -m ruff check .
	TEST_WORKERS=$(TEST_WORKERS) TEST_ORDER=$(TEST_ORDER) scripts/run_tests.sh

bench:
	@scripts/setup_env.sh $(BENCH_EXTRAS)
	.venv/bin/python -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider \
		$(if $(HICMAE_PATH),--hicmae-path "$(HICMAE_PATH)")

extra:
	@test -n "$(EXTRAS)" || { echo "make extra: name them, e.g. make extra EXTRAS=hicmae (see README, Extras)" >&2; exit 2; }
	@scripts/setup_env.sh $(EXTRAS)
