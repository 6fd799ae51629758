# Routine tasks. Every target makes (or refreshes) the virtual environment .venv first when it is missing
# or older than pyproject.toml, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
PY ?= .venv/bin/python
# Test processes: two keep a 2-core machine busy while one waits for Flower or Ray to start.
TEST_WORKERS ?= 2
STAMP := .venv/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install demo run test test-fast lint format bench clean

install:            ## (re)make the virtual environment: fedsim, its tests' tools and CPU-or-GPU torch
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# The stamp is newer than pyproject.toml once everything it declares is installed.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { echo "error: fedsim needs Python 3.11 or newer as $(PYTHON) (or run make PYTHON=/path/to/python3.11)"; exit 2; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
	  { echo "error: $(PYTHON) has no venv module or ensurepip: install python3-venv (apt-get install python3-venv)"; exit 2; }
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)      ## the classroom demo (fedsim demo dlg): offline, pictures at the end
	$(PY) -m fedsim demo dlg

run: $(STAMP)       ## the default federated run on the shipped MNIST sample, offline
	$(PY) -m fedsim run

test: $(STAMP)      ## the whole test suite (what CI runs), on TEST_WORKERS processes
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP) ## quick checks: everything but the end-to-end runs and the long attack optimisations
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check fedsim clients server

format: $(STAMP)
	$(PY) -m ruff format fedsim clients server tests benchmarks
	$(PY) -m ruff check --fix .

bench: $(STAMP)     ## the curious server's overhead (see benchmarks/)
	$(PY) benchmarks/bench_curious_overhead.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
