# The README's commands. Everything runs from the virtual environment in .venv/, created and
# filled from this repository's own files (pyproject.toml + constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Real CIFAR-10 (Parquet) for quickstart, tests and benchmarks; override with CIFAR10_DIR=...
CIFAR10_DIR ?= $(abspath ../shared/data/cifar10)
export CIFAR10_DIR
export MLFLOW_DISABLE_TELEMETRY = true
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/python -m pipeline.engine --config configs/smoke.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pipeline jobs tests bench
	$(BIN)/ruff format --check pipeline jobs tests bench

bench: install
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
