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

.PHONY: install quickstart test lint bench bench-asha clean

# uv installs the same pinned set as pip would, unpacking and byte-compiling in parallel: a
# fresh install takes about a quarter of pip's time (bench/HISTORY.md). The bytecode matters:
# with PYTHONDONTWRITEBYTECODE set, as on CI, an uncompiled venv recompiles every import in
# every process (each Ray worker included).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

QUICKSTART_DATA := .data/cifar10-lt-if100-quickstart

# Prepare CIFAR-10-LT shards (IF 100, 1,000 head images; the sizes configs/quickstart.yaml
# states) into a local "object store" folder, train configs/quickstart.yaml with 2 Ray Train
# workers on CPU, record the run in MLflow (./mlflow.db) and register the model.
quickstart: install
	$(BIN)/python -m jobs.prepare_data --dataset cifar10 --imbalance-factor 100 --n-max 1000 \
	    --val-per-class 20 --test-per-class 100 --output $(QUICKSTART_DATA)
	$(BIN)/python -m jobs.train --config configs/quickstart.yaml --run-name quickstart-$$(date +%Y%m%d-%H%M%S) \
	    --set data.uri=$(QUICKSTART_DATA)
	@echo
	@echo "MLflow UI:    $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1  (then http://127.0.0.1:5000)"
	@echo "Load model:   $(BIN)/python -c \"import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); m = mlflow.pyfunc.load_model('models:/shike-cifar10-lt-if100@candidate'); print(m.metadata.metadata)\""
	@echo "Without Ray:  $(BIN)/python -m pipeline.training.engine --config configs/quickstart.yaml"

# The suite in parallel lanes (tests/lanes.sh says which and why). Our own modules are
# byte-compiled first for the same reason as the venv: each test starts drivers, jobs and Ray
# workers that import them.
test: install
	@$(BIN)/python -m compileall -q -j 0 pipeline jobs bench tests > /dev/null
	@bash tests/lanes.sh $(BIN)/python

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check pipeline jobs tests bench
	$(BIN)/ruff format --check pipeline jobs tests bench

# The CPU benchmarks of BENCHMARKS.md: each replaces its own section there (the table it
# replaces goes to bench/HISTORY.md). bench-asha is the 8-trial sweep comparison (622 s on
# 2 cores; make bench 384 s: BENCHMARKS.md, "Running the benchmarks").
bench: install
	$(BIN)/python -m bench.train_step --steps 10
	$(BIN)/python -m bench.loader_speed --data $(CIFAR10_DIR) --workers 2
	$(BIN)/python -m bench.augment_speed --data $(CIFAR10_DIR)
	$(BIN)/python -m bench.data_pipeline --epochs 2
	$(BIN)/python -m bench.pipeline_efficiency --workers 1 2 --epochs 3
	$(BIN)/python -m bench.decode_speed
	$(BIN)/python -m bench.prepare_throughput

bench-asha: install
	$(BIN)/python -m bench.asha_savings

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
