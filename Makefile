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

.PHONY: setup test demo claim bench launch-budget gpu-check-dry gpu-wheels clean help

help:
	@echo "make setup   - create $(VENV) (torch first, then the project with its extras)"
	@echo "make test    - set up and run the test suite (CPU; Triton kernels via TRITON_INTERPRET=1)"
	@echo "make demo    - set up and run the demo: synthetic shards -> DDPM -> DiTi -> report (CPU)"
	@echo "make claim   - the claim experiment (<= 100 min, 2 CPU cores, resumable): results in benchmarks/results/claim/"
	@echo "               CLAIM_SMOKE=1: every phase on tiny sizes (~1 min), results in runs/claim-smoke/results/"
	@echo "make bench   - CPU benchmarks (pytest-benchmark, JSON under benchmarks/results/)"
	@echo "make launch-budget - kernel launches per training step, per preset (docs/performance.md)"
	@echo "make gpu-wheels / gpu-check-dry - prepare / dry-run the one-shot GPU check (docs/performance.md)"

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
	$(PY) -m pytest -q --durations=25 tests

demo: setup
	$(PY) -m diti_fast.demo

# DiTi vs PDAE on synthetic data with known factors (docs/evaluation.md, "The claim"). Rerun the
# same command after an interruption: finished phases are skipped, training resumes.
claim: setup
	CLAIM_FROM_MAKE=1 $(PY) -m diti_fast.claim $(if $(CLAIM_SMOKE),--smoke,) $(CLAIM_ARGS)

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only \
		--benchmark-json=benchmarks/results/cpu-$$(date +%Y-%m-%d).json

# Ops (eager) per step for each preset, with and without the fused kernels; LAUNCH_BUDGET_COMPILE=1
# adds Inductor's generated-kernel count (minutes per preset on a CPU). Not under benchmarks/results/:
# plot_results.py reads that folder for the kernel benchmarks' table.
launch-budget: setup
	$(PY) -m pytest benchmarks/bench_launch_budget.py -q --benchmark-enable --benchmark-only \
		--benchmark-json=.benchmarks/launch-budget-$$(date +%Y-%m-%d).json

# The plan (phase budgets within the window, else exit 2), the wheel preflight of .whl/ for the
# GPU machine's Python 3.12 (exit 3 when a wheel is missing or unusable) and the device call.
gpu-check-dry: setup
	$(PY) benchmarks/gpu_check.py --dry-run

# Packages the GPU machine (Python 3.12, torch + triton preinstalled, no registry) lacks; installed
# there by benchmarks/gpu_check.sh into /tmp/site. See docs/performance.md.
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7
GPU_WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps $(GPU_WHEEL_TAGS) -d .whl $(GPU_WHEELS)
	# deepspeed ships only an sdist; its setup.py imports torch, hence no build isolation.
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	# Check what was built: every wheel present, tags for cp312, requirements met, imports.
	$(PY) benchmarks/gpu_check.py --dry-run

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks runs
