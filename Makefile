# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv,
# installs what it needs from PyPI, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

.PHONY: install install-test demo lint test test-all test-fast
install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

# PyTorch is only the tests' oracle: the CPU build first, or pip resolves a multi-GB CUDA one.
install-test: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,tpu]'

# The demo trains and then writes its report (report.json, samples_before_after.png,
# curves.png) into the workdir; a second run starts afresh.
demo: install
	rm -rf workdirs/demo
	$(BIN)/python -m dpo_jax.main --config configs/demo.py --workdir workdirs/demo

lint: install-test
	$(BIN)/ruff check .

# Lint first (seconds), then two workers: XLA compiles on one core at a time, so two test
# processes keep both busy. The 15 slowest tests are listed at the end: where CI's time goes.
test: lint
	$(BIN)/python -m pytest -n 2 -m "not expensive" --durations=15

# Also the few tests marked `expensive` (over a minute of CPU each).
test-all: lint
	$(BIN)/python -m pytest -n 2

# The edit-test loop: everything but the tests that train or start processes.
test-fast: install-test
	$(BIN)/python -m pytest -n 2 -m "not slow"
