# Skyferry: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench bench-events bench-overlay schema clean fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py vna_agent/dataplane/_fastpath.c vna_agent/dataplane/_fastpath_core.c vna_agent/dataplane/_fastpath_core.h deploy/install-deps.sh
	bash deploy/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/skyferry demo

test: setup
	$(BIN)/pytest -m "slow or not slow" -q -p no:cacheprovider

test-fast: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy bus manager vnm migrater vna_agent capture_agent deploy_agent mapper deploy/lab

fuzz: setup
	$(BIN)/python -m tests.fuzz.python --seconds 60
	$(BIN)/python -m tests.fuzz.native --seconds 60

bench: bench-events bench-overlay

bench-overlay: setup
	$(BIN)/python -m bench.bench_overlay --repeat 3 --duration 5 \
	  --providers plain,vxlan,openvpn,tinc,stream,datagram,stream-py,datagram-py --out docs/benchmarks.md

bench-events: setup
	$(BIN)/python -m bench.bench_events --events 100000 --repeat 3 --out docs/benchmarks.md

schema: setup
	$(BIN)/skyferry schema --offline --out docs/asyncapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
