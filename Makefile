# diti-fast: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# Deepspeed on a machine without CUDA must be told to use its CPU accelerator.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup test test-fast demo bench clean help

help:
	@echo "make setup   - create $(VENV) (torch first, then the project with its extras)"
	@echo "make test    - set up and run the test suite (CPU; Triton kernels via TRITON_INTERPRET=1)"
	@echo "make demo    - set up and run the demo: synthetic shards -> DDPM -> DiTi -> report (CPU)"
	@echo "make bench   - CPU benchmarks (pytest-benchmark, JSON under benchmarks/results/)"

setup: $(VENV)/.installed

# torch goes in first, from the pinned CPU wheel, unless the venv already has one: an unpinned
# `torch` requirement on a clean machine would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) "$(TRITON_SPEC)"
	$(PIP) -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m diti_fast.demo

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only \
		--benchmark-json=benchmarks/results/cpu-$$(date +%Y-%m-%d).json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks runs
