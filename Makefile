# influencelab — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORE := $(VENV)/.core
PYTHON ?= python3
DIR ?= multirun
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint format bench report clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

# the core package alone (what `make demo` needs), then the extras for tests, benchmarks, clusters and mnist_5k
$(CORE): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	@touch $(CORE)

$(STAMP): $(CORE)
	$(PY) -m pip install -q -e '.[dev,bench,cluster,mnist5k]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install influencelab with dev, benchmark and cluster extras (idempotent)

demo: $(CORE) ## Quickstart on embedded digits (core dependencies only): train, EK-FAC, mislabel detection, attribution figure (<5 min)
	$(VENV)/bin/influencelab experiment=quickstart $(ARGS)

test: $(STAMP) ## Run the default test suite (slow tests excluded)
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP) ## Run every test, including those marked slow
	$(PY) -m pytest -m '' $(ARGS)

lint: $(STAMP) ## Static checks (ruff)
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP) ## Auto-format and fix imports (ruff)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP) ## Benchmarks against kronfluence and dattri (prints tables with ratios)
	$(PY) benchmarks/run_all.py $(ARGS)

report: $(STAMP) ## Table (markdown + CSV) and comparison plots of a run/multirun dir: make report DIR=multirun/...
	$(VENV)/bin/influencelab-report $(DIR)

clean: ## Remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun cache .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
