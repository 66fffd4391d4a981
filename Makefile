# The two commands of the README: `make demo` and `make test`. Both create .venv, install the pinned
# dependencies (pyproject.toml + constraints.txt), resolve the Delta jars into .cache/ivy once (and
# archive the classes a Spark session loads into .cache/cds, for faster starts), and
# reuse all of it on later runs.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP     := $(VENV)/.dev-installed
JARS_STAMP    := .cache/ivy/.jars-resolved
PYTEST_ARGS ?=
SOAK_ARGS ?=
# Two pytest-xdist workers (a test runs in one of them, whole; each has its own Spark): on 2 cores the
# suite's Spark work overlaps the other worker's JVM start-ups, subprocesses and Postgres waits
# (23.5 -> 18.5 min on 2026-12-01). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
XDIST  := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

.PHONY: demo test test-slow test-all bench soak install dev jars check-python check-java unit integration dags dashboard clean help dbt

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

check-python:
	@test -n "$(PYTHON)" || { echo "error: Python 3.11+ not found; install python3.11 (or newer) and retry" >&2; exit 2; }

check-java:
	@command -v java >/dev/null 2>&1 || test -x "$$JAVA_HOME/bin/java" || { \
	  echo "error: Java 17+ not found; install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME" >&2; exit 2; }

$(RUNTIME_STAMP): pyproject.toml constraints.txt | check-python
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	@echo ">> installing runtime dependencies (first run: a few minutes)"
	$(PIP) install --progress-bar on -c constraints.txt -e .
	@touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	@echo ">> installing test dependencies (pytest, Airflow)"
	$(PIP) install --progress-bar on -c constraints.txt -e ".[dev,airflow]"
	@touch $@

$(JARS_STAMP): $(RUNTIME_STAMP) | check-java
	@echo ">> resolving the Delta jars from Maven Central into .cache/ivy and archiving Spark's classes into .cache/cds (first run only)"
	$(BIN)/python -m lakehouse.spark
	@touch $@

install: $(RUNTIME_STAMP) $(JARS_STAMP)  ## runtime install + Delta jars
dev: $(DEV_STAMP) $(JARS_STAMP)          ## runtime + test dependencies
jars: $(JARS_STAMP)                      ## resolve and cache the Delta jars

demo: install  ## run the main job end to end on embedded defaults
	$(BIN)/lakehouse demo

# Two tiers, by cost: `make test` leaves out the tests marked `slow` (most a minute or more on 2 cores:
# kill -9 and restart, the DAG run, the demo, dbt, training, the gold stream's Spark route), so that it
# stays under about 20 minutes; `make test-slow` runs those; CI (.ci/run) runs both.
test: dev  ## run the test suite's fast tier (all but the tests marked slow)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

test-slow: dev  ## run the slow tier (kill -9, the DAG run, demo, dbt, training, Spark route)
	$(BIN)/python -m pytest $(XDIST) -m slow $(PYTEST_ARGS)

test-all: dev  ## run every test in one go (both tiers)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

unit: dev  ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: dev  ## integration tests only
	$(BIN)/python -m pytest $(XDIST) tests/integration $(PYTEST_ARGS)

dbt: install  ## build the dbt marts (models + tests) on the current data; DBT_ARGS=... for more
	$(BIN)/lakehouse dbt build $(DBT_ARGS)

dags: dev  ## DAG tests (integrity + a real `airflow dags test` run)
	$(BIN)/python -m pytest tests/dags $(PYTEST_ARGS)

dashboard: install  ## render the risk dashboard from the marts (data/reports/dashboard.html)
	$(BIN)/lakehouse dashboard

bench: install  ## benchmarks; JSON results under bench/results/
	$(BIN)/python bench/run.py

soak: install  ## crash soak: kill -9 the streaming mirror job, compare with an uninterrupted run; SOAK_ARGS=...
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:  ## remove generated data (keeps .venv and the jar cache)
	rm -rf data spark-warehouse metastore_db derby.log .pytest_cache
