# Dev set-up and the two README commands. `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch for development and CI (installs from local disk here); the package itself accepts a range.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/persian-qlora demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

bench: install
	$(BIN)/python benchmarks/prepare_throughput.py
	$(BIN)/python benchmarks/kbit_preparation_memory.py
	$(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
