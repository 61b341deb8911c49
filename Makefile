# The two commands of the README. Each creates .venv if missing and installs what it needs.
# Optional extras go through the same script, which never replaces the installed torch:
#   make extra EXTRAS=hicmae          add extras (comma-separated) to .venv
#   make bench HICMAE_PATH=/path      also installs `hicmae` and times HiCMAE's own model
.PHONY: demo test bench extra

comma := ,
TEST_EXTRAS := dev,bench,data,train
# `make test` runs scripts/run_tests.sh, which owns its settings: TEST_WORKERS (2 xdist workers by default)
# and TEST_ORDER=reversed, given as variables to make or in the environment.
DEMO_EXTRAS := data,train
BENCH_EXTRAS := $(TEST_EXTRAS)$(if $(HICMAE_PATH),$(comma)hicmae)

demo:
	@scripts/setup_env.sh $(DEMO_EXTRAS)
	@scripts/demo.sh

test:
	@scripts/setup_env.sh $(TEST_EXTRAS)
	.venv/bin/python -m ruff check .
	scripts/run_tests.sh

bench:
	@scripts/setup_env.sh $(BENCH_EXTRAS)
	.venv/bin/python -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider \
		$(if $(HICMAE_PATH),--hicmae-path "$(HICMAE_PATH)")

extra:
	@test -n "$(EXTRAS)" || { echo "make extra: name them, e.g. make extra EXTRAS=hicmae (see README, Extras)" >&2; exit 2; }
	@scripts/setup_env.sh $(EXTRAS)
