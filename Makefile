# Two commands do everything on a fresh machine:
#   make demo   the main job: the demo on the embedded default store
#   make test   lint (ruff, the import layers), type-check and the whole test suite (starts Redis/Postgres if needed)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-oldest lint typecheck services bench clean

$(STAMP): pyproject.toml requirements-dev.txt $(wildcard stores/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cli]" $(foreach d,$(wildcard stores/*/pyproject.toml),-e $(dir $(d))) -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/factorial-tokens demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy factorial_tokens $(filter-out %.egg-info,$(wildcard stores/*/factorial_tokens_*))

services:
	bash scripts/ensure-services.sh

# The suite waits more than it computes (simulated latency, token lifetimes, storms), so it
# runs in TEST_WORKERS processes; conftest.py keeps the multi-process storms on one of them.
TEST_WORKERS ?= 3

test: $(STAMP) lint typecheck services
	$(BIN)/pytest -n $(TEST_WORKERS)

# The suite again with the oldest dependency versions the projects declare (on demand, not
# part of `make test`): requirements-oldest.txt pins each runtime dependency's floor.
OLDEST := .venv-oldest
$(OLDEST)/.installed: pyproject.toml requirements-dev.txt requirements-oldest.txt $(wildcard stores/*/pyproject.toml)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -e ".[cli]" $(foreach d,$(wildcard stores/*/pyproject.toml),-e $(dir $(d))) -r requirements-dev.txt -r requirements-oldest.txt
	touch $@

test-oldest: $(OLDEST)/.installed services
	$(OLDEST)/bin/pytest -n $(TEST_WORKERS)

# Benchmarks (on demand, not part of the tests): `make bench BENCH_ARGS="--quick"`; see benchmarks/README.md
bench: $(STAMP) services
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache
