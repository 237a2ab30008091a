# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: run test lint format bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## run: start the demo service (embedded in-process Redis when REDIS_URL is unset)
run: $(STAMP)
	$(BIN)/uvicorn app.main:app --host $(HOST) --port $(PORT) --loop uvloop --http httptools

## test: unit tests (fakeredis) and integration tests (real redis-server) with coverage
# PYTHONNODEBUGRANGES: CPython 3.11's traceback carets call ast.parse; when a finalizer's
# warning is formatted while pytest rewrites a module, that re-entrant parse raises
# "SystemError: AST constructor recursion depth mismatch" (fixed in 3.11.8+/3.12).
test: export PYTHONNODEBUGRANGES = 1
test: $(STAMP)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage combine --quiet 2>/dev/null || true
	$(BIN)/coverage report

## lint: ruff check, ruff format --check, mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix app tests bench
	$(BIN)/ruff format app tests bench

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e ".[bench]"
	# fastapi-limiter 0.1.x (the API most deployed code uses) beside 0.2, loaded as fastapi_limiter_016
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps --upgrade --target bench/.vendor/fastapi_limiter_016 "fastapi-limiter==0.1.6"
	touch $(BENCH_STAMP)

## bench: our code and the peers on one private redis-server, ratios in one run
bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q wrk) || echo "wrk unavailable: the HTTP group is skipped"
	$(BENCH_VENV)/bin/python -m bench $(BENCH_ARGS)

SOAK_SECONDS ?= 60

## soak: the demo under mixed load for SOAK_SECONDS, then memory, connection, TTL and log checks
soak: $(STAMP)
	$(BIN)/python scripts/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) bench/.vendor/fastapi_limiter_016 .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
