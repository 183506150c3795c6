# vla_train developer commands. `make demo` and `make test` each create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SIM_STAMP := $(VENV)/.installed-sim

.PHONY: help install install-sim demo test test-fast lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

$(SIM_STAMP): $(STAMP)
	$(BIN)/pip install -e ".[dev,sim]"
	touch $(SIM_STAMP)

install: $(STAMP)  ## create .venv: pinned torch ($(TORCH)), then vla_train[dev]

install-sim: $(SIM_STAMP)  ## also the simulator extra (Meta-World, MuJoCo) for vla-eval and vla-data metaworld

demo: $(STAMP)  ## train + validate + export + predict on the embedded synthetic default (configs/demo.yaml)
	$(BIN)/vla-train --config_path configs/demo.yaml
	$(BIN)/vla-export --run_dir runs/demo --predict_samples 3

test: $(SIM_STAMP)  ## the whole test suite, slow end-to-end tests included (2 workers, then the timed tests alone)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not exclusive" tests
	$(BIN)/python -m pytest -q -m exclusive tests

test-fast: $(SIM_STAMP)  ## unit tests only (skips the slow end-to-end runs)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check vla_train scripts tests
	$(BIN)/ruff format --check vla_train scripts tests

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix vla_train scripts tests
	$(BIN)/ruff format vla_train scripts tests

clean:  ## remove runs, caches and the venv
	rm -rf $(VENV) runs .pytest_cache
