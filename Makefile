# The two commands of the README. Each creates .venv if missing and installs what it needs.
.PHONY: demo test bench

TEST_EXTRAS := dev,bench,data,train
DEMO_EXTRAS := data,train

demo:
	@scripts/setup_env.sh $(DEMO_EXTRAS)
	@scripts/demo.sh

test:
	@scripts/setup_env.sh $(TEST_EXTRAS)
	.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15

bench:
	@scripts/setup_env.sh $(TEST_EXTRAS)
	.venv/bin/python -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider
