# Two commands do all the set-up: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs (torch pinned to the CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgetp-installed

.PHONY: demo test test-slow test-all test-docker test-kernels lint clean

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

# The Docker testbed, offline (root): installs Debian's Docker engine and compose if missing,
# starts an engine if none runs (and stops it after), builds the image without a registry
# (docker/build-offline.sh: debootstrap base image, wheelhouse, both cached), then runs the
# tests marked docker (tests/integration/test_docker_testbed.py). docker/README.md
test-docker: $(STAMP)
	docker/engine.sh install
	docker/engine.sh run sh -c 'PYTHON=$(BIN)/python docker/build-offline.sh \
		&& $(BIN)/pytest -q -p no:cacheprovider -m docker tests/integration/test_docker_testbed.py'

# The decode kernels' C harness against Python's reference outputs, built for this CPU
# (-march=native), AVX2 (x86-64-v3), SSE4.2 (x86-64-v2) and AArch64 (Debian's
# gcc-aarch64-linux-gnu, run under qemu-aarch64 with and without the dot product); .ci/run
# installs the cross compiler and qemu. tests/kernels/run_harness.py
test-kernels: $(STAMP)
	$(BIN)/python tests/kernels/run_harness.py

# ruff (style), import-linter (the layering contract in pyproject.toml), mypy (types)
lint: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check edgetp tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
