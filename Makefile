# Two commands on a fresh machine: `make run` and `make test`.
# Every environment is installed from uv.lock (`uv sync --locked`): what CI tested is what runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: the suite waits on servers, timeouts and other
# processes more than it computes, so two workers on two cores nearly halve its time.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
REPORTS ?= reports

# uv from PATH, else a pinned copy bootstrapped from the package index into .uv/
UV_VERSION := 0.13.9
UV ?= $(shell command -v uv 2>/dev/null)
ifeq ($(strip $(UV)),)
UV := .uv/bin/uv
endif
export UV_PYTHON_DOWNLOADS := never
export NO_MKDOCS_2_WARNING := 1

.PHONY: run test test-repeat test-latest lint format lock bench soak docs docs-serve clean

.uv/bin/uv:
	$(PYTHON) -m venv .uv
	.uv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(STAMP): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --extra dev --group docs --python $(PYTHON)
	touch $(STAMP)

## lock: refresh uv.lock to the newest versions pyproject.toml's ranges allow (commit the result)
lock: | $(UV)
	$(UV) lock --upgrade

## run: start the demo service (embedded in-process Redis when REDIS_URL is unset)
run: $(STAMP)
	$(BIN)/uvicorn app.main:app --host $(HOST) --port $(PORT) --loop uvloop --http httptools

## test: unit tests (fakeredis) and integration tests (real redis-server) with coverage;
## failures are listed at the end and kept in $(REPORTS)/junit.xml and $(REPORTS)/failures.txt
# PYTHONNODEBUGRANGES: CPython 3.11's traceback carets call ast.parse; when a finalizer's
# warning is formatted while pytest rewrites a module, that re-entrant parse raises
# "SystemError: AST constructor recursion depth mismatch" (fixed in 3.11.8+/3.12).
# The second leg (skipped when PYTEST_ARGS picks tests): the services' integration tests once
# more with auto-pipelining off, so the plain pooled path stays as tested as the default.
POOL_LEG ?= tests/integration/services
test: export PYTHONNODEBUGRANGES = 1
test: $(STAMP)
	@mkdir -p $(REPORTS)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest $(XDIST) --junitxml=$(REPORTS)/junit.xml $(PYTEST_ARGS) || { \
		status=$$?; $(BIN)/python scripts/test_failures.py $(REPORTS)/junit.xml $(REPORTS)/failures.txt; exit $$status; }
	$(if $(PYTEST_ARGS),,REDIS_AUTOPIPELINE=false $(BIN)/coverage run -m pytest $(XDIST) \
		--junitxml=$(REPORTS)/junit-pool.xml $(POOL_LEG) || { status=$$?; \
		$(BIN)/python scripts/test_failures.py $(REPORTS)/junit-pool.xml $(REPORTS)/failures.txt; exit $$status; })
	$(BIN)/coverage combine --quiet 2>/dev/null || true
	$(BIN)/coverage report

REPEAT ?= 5
## test-repeat: run the suite (or PYTEST_ARGS' part of it) REPEAT times (TEST_WORKERS as in test); every failure with its
## test id and traceback goes to $(REPORTS)/repeat/failures.txt. CONTEND=1 adds a busy process;
## LEAKS=1 collects garbage after each integration test, so a leak fails the test that leaked.
test-repeat: export PYTHONNODEBUGRANGES = 1
test-repeat: $(STAMP)
	$(BIN)/python scripts/test_repeat.py --times $(REPEAT) --reports $(REPORTS)/repeat \
		$(if $(CONTEND),--contend) $(if $(LEAKS),--leak-check) -- $(XDIST) $(PYTEST_ARGS)

## test-latest: lint and test against the newest releases pyproject.toml allows (not the lock),
## in .venv-latest, so upstream drift shows up before it reaches main. Not part of CI.
test-latest: | $(UV)
	rm -rf .venv-latest
	$(UV) venv --quiet --python $(PYTHON) .venv-latest
	$(UV) pip install --python .venv-latest/bin/python --resolution highest -e ".[dev]"
	touch .venv-latest/.installed
	$(UV) pip list --python .venv-latest/bin/python --format freeze > .venv-latest/versions.txt
	$(MAKE) lint test VENV=.venv-latest REPORTS=$(REPORTS)/latest

## lint: ruff check, ruff format --check, mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check app tests bench scripts
	$(BIN)/ruff format --check app tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix app tests bench scripts
	$(BIN)/ruff format app tests bench scripts

## docs: build the documentation site into site/, failing on any warning (broken link, missing reference)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

## docs-serve: the site on http://$(HOST):8001, rebuilt on every change
docs-serve: $(STAMP)
	$(BIN)/mkdocs serve --dev-addr $(HOST):8001

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=
BENCH_CPU_ARGS ?=

$(BENCH_STAMP): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(BENCH_VENV) $(UV) sync --locked --extra bench --python $(PYTHON)
	# fastapi-limiter 0.1.x (the API most deployed code uses) beside 0.2, loaded as fastapi_limiter_016
	$(UV) pip install --quiet --python $(BENCH_VENV)/bin/python --no-deps --target bench/.vendor/fastapi_limiter_016 "fastapi-limiter==0.1.6"
	touch $(BENCH_STAMP)

## bench: our code and the peers on one private redis-server, ratios in one run;
## then CPU µs per operation (bench.cpu); both are written into docs/benchmarks.md
## (commit it with the run's date and machine)
bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q wrk) || echo "wrk unavailable: the HTTP group is skipped"
	$(BENCH_VENV)/bin/python -m bench $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python -m bench.cpu $(BENCH_CPU_ARGS)
	$(BENCH_VENV)/bin/python -m bench.page bench/results/latest.json docs/benchmarks.md bench/results/cpu.json

SOAK_SECONDS ?= 60

## soak: the demo under mixed load for SOAK_SECONDS, then memory, connection, TTL and log checks
soak: $(STAMP)
	$(BIN)/python scripts/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf site $(VENV) $(BENCH_VENV) .venv-latest .uv bench/.vendor/fastapi_limiter_016 $(REPORTS) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
