# Two commands do all the set-up: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs (torch pinned to the CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgetp-installed

.PHONY: demo test test-slow test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgetp demo

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/pytest -q -m "slow or not slow"

# ruff (style), import-linter (the layering contract in pyproject.toml), mypy (types)
lint: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check edgetp tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
