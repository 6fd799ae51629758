# Routine tasks. Every target uses the virtual environment made by `make install`.
PY ?= .venv/bin/python
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install demo run test test-fast lint format bench clean

install:            ## a virtual environment with fedsim, its tests' tools and CPU-or-GPU torch
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test]"

demo:               ## the classroom demo (fedsim demo dlg): offline, pictures at the end
	$(PY) -m fedsim demo dlg

run:                ## the default federated run on the shipped MNIST sample, offline
	$(PY) -m fedsim run

test:               ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast:          ## everything but the end-to-end simulations
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check fedsim clients server

format:
	$(PY) -m ruff format fedsim clients server tests benchmarks
	$(PY) -m ruff check --fix .

bench:              ## the curious server's overhead (see benchmarks/)
	$(PY) benchmarks/bench_curious_overhead.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
