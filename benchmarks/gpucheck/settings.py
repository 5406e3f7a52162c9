"""What a gpu_check run does and what it checks against: phase order and budgets, files, goals,
packages, the wheels the GPU machine needs.

Pure constants (no torch), shared by the orchestrator (``benchmarks/gpu_check.py``), the phase
modules, the wheel preflight and the results analysis.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- the window
# A lent GPU comes as one window of about 10 minutes, the machine's start included: the command
# gets about 420 s of it. The default plan spends 400 s, counted from gpu_check.sh's start (the
# wheel install included), leaving 20 s for the last kill and summary.md.
DEFAULT_WINDOW = 420
DEVICE_TIMEOUT_S = DEFAULT_WINDOW          # the device tool's timeout_s for the run
DEVICE_COMMAND = "PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh"
DEVICE_CARRY = [".whl"]

# Seconds per phase, in the order they run: the most valuable numbers first, so that a window cut
# short still returns them. Unused seconds carry forward; a phase never eats into the seconds of
# the phases after it. compile is last and optional: torch.compile's cold start (a minute or
# two) gets whatever is left.
PHASE_BUDGETS = {
    "env": 30,            # packages, device, import origins
    "ceilings": 15,       # copy bandwidth, matmul rates
    "sweep": 130,         # the step: batch 16/128 x NHWC/NCHW x graph x fused, + the original's configuration
    "kernels": 45,        # benchmarks/kernel_timing.py: fused kernels timed inside a CUDA graph
    "kernel_tests": 40,   # the kernel test files, compiled
    "engine": 100,        # train() under DeepSpeed: original configuration vs preset, loss curves
    "compile": 40,        # optional: the preset with torch.compile (cold compile)
}
DEFAULT_BUDGET = sum(PHASE_BUDGETS.values())
# Not in the default plan (select with --phases): the pytest-benchmark kernel files. Their
# per-call timings include Python dispatch, which the CUDA-graph timings of phase kernels do not.
EXTRA_PHASE_BUDGETS = {"bench": 60}
PHASE_ORDER = ["env", "ceilings", "sweep", "kernels", "kernel_tests", "bench", "engine", "compile"]
MIN_PHASE_S = 4           # a phase with less time than this left is "not reached"
KILL_GRACE_S = 3          # SIGTERM, then this long, then SIGKILL (the whole process group)
LOG_CAP_BYTES = 2 << 20   # per phase in log.txt: head and tail kept, the middle elided

# Only the kernels' own test files: the engine's CPU tests (DeepSpeed's CPU accelerator) are not
# device tests and are skipped by tests/conftest.py when CUDA is present.
KERNEL_TESTS = ["tests/test_fused_norm.py", "tests/test_fused_loss.py", "tests/test_attention.py",
                "tests/test_masks_prefix.py", "tests/test_kernel_timing.py"]
KERNEL_TIMING_SCRIPT = "benchmarks/kernel_timing.py"
# One pytest run per file (phase bench, optional), shares of the phase's time.
BENCH_FILES = {"benchmarks/bench_fused_norm.py": 0.40, "benchmarks/bench_fused_loss.py": 0.27,
               "benchmarks/bench_attention.py": 0.23, "benchmarks/bench_latent_mask.py": 0.10}
BENCH_ARGS = ["--benchmark-enable", "--benchmark-only", "--benchmark-min-rounds=5",
              "--benchmark-max-time=0.25", "--benchmark-warmup=off"]

# ----------------------------------------------------------------------------- the runs
ENGINE_FAST_CONFIG = "configs/celeba64.yaml"
ENGINE_ORIGINAL_CONFIG = "configs/celeba64_original.yaml"
TINY_CONFIG = "configs/shapes32.yaml"   # --tiny (CPU rehearsal): the demo's small network

# Overrides of every timed run: synthetic data staged on the device once (data.source=fixed: the
# same uint8 batch for every row, no loader), no host-side extras, no checkpoints on the way.
COMMON_OVERRIDES = ["data.source=fixed", "log.progress=false", "log.tensorboard=false", "log.visuals_every=0",
                    "checkpoint.every=0", "checkpoint.on_signal=false", "checkpoint.elastic=false",
                    "checkpoint.resume=false"]
# The original's configuration as overrides of the preset (what configs/celeba64_original.yaml
# sets for speed): fp32, NCHW, math attention, unfused, eager, no compile.
ORIGINAL_OVERRIDES = ["run.precision=fp32", "fast.channels_last=false", "fast.attention=math",
                      "fast.fused_norm=false", "fast.fused_loss=false", "fast.cuda_graph=false",
                      "fast.compile=false"]

# Phase sweep: per-GPU batches (16 = the users' 8-GPU launch of global 128; 128 = one GPU).
SWEEP_BATCHES = (16, 128)
# Per row: N warm-up steps then N timed steps, each one log interval, so the only host syncs are
# at their ends. The warm-up holds cuDNN's autotuning and the graph's 3 eager steps, capture and
# first replay. A row's steps stop at its cap (run.time_limit_minutes; the engine's own check).
SWEEP_STEPS = {16: 20, 128: 8}
SWEEP_ROW_CAP_S = {16: 10.0, 128: 20.0}
ENGINE_STEPS = 100
ENGINE_LOG_EVERY = 10
ENGINE_WARMUP_STEPS = 20       # steady-state images/s counts the intervals from this step on
ENGINE_BATCH = 128
COMPILE_STEPS = (20, 20)       # warm-up (the compile), timed
LOSS_MATCH_TOL = 0.05          # |mean loss fast - original| / original over the second half
# Engine runs: name -> (which config, extra overrides). fast_fp32 (the preset in fp32) runs when
# time is left, so the kernels' and the graph's own share shows apart from bf16's.
ENGINE_RUNS = {"original": ("ORIGINAL", []), "fast": ("FAST", ["fast.compile=false"]),
               "fast_fp32": ("FAST", ["fast.compile=false", "run.precision=fp32"])}

# Tiny sizes of the CPU rehearsal (--allow-cpu --tiny): every phase, small, in about a minute.
TINY = {"sweep_batch": 2, "sweep_steps": 1, "engine_steps": 2, "engine_log_every": 1, "engine_batch": 2,
        "compile_steps": (1, 1), "ceiling_copy_bytes": 1 << 26, "ceiling_matmul_n": 512}

# Goals (what summary.md and the docs table check).
GOALS = {
    "gn_frac_copy": 0.80,      # fused GN fwd+bwd, 32² and 64²: fraction of copy bandwidth
    "gn_vs_eager": 3.0,
    "gn_vs_compile": 1.3,
    "loss_vs_compile": 1.2,
    "attn_sdpa_vs_math": 3.0,  # at 16x16
    "engine_speedup": 3.0,
    "engine_mfu": 0.35,        # bf16 model FLOP utilisation of the step
}

# ----------------------------------------------------------------------------- packages
# Packages the phases need, by import name -> distribution name (for the version).
PACKAGES = {
    "torch": "torch", "triton": "triton", "numpy": "numpy", "yaml": "pyyaml", "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark", "cpuinfo": "py-cpuinfo", "xdist": "pytest-xdist",
    "safetensors": "safetensors", "deepspeed": "deepspeed", "webdataset": "webdataset",
    "braceexpand": "braceexpand", "pydantic": "pydantic", "hjson": "hjson", "msgpack": "msgpack",
    "einops": "einops", "psutil": "psutil", "ninja": "ninja", "packaging": "packaging", "tqdm": "tqdm",
    "xformers": "xformers", "matplotlib": "matplotlib",
}
OPTIONAL = {"xdist", "xformers", "matplotlib", "ninja", "webdataset", "braceexpand"}
_TRAIN = ["torch", "deepspeed", "pydantic", "hjson", "msgpack", "einops", "psutil", "packaging", "tqdm",
          "yaml", "safetensors", "numpy"]
# What each phase imports. train() with data.source=fixed never opens a shard: no webdataset.
PHASE_NEEDS = {
    "ceilings": ["torch"],
    "sweep": _TRAIN + ["triton"],
    "kernels": ["torch", "triton"],
    "kernel_tests": ["torch", "triton", "pytest"],
    "bench": ["torch", "triton", "pytest", "pytest_benchmark"],
    "engine": _TRAIN,
    "compile": _TRAIN + ["triton"],
}
# A device run brings back at most 8 files: 6 phase JSONs, summary.md and log.txt. The kernel
# tests' summary (parsed by this process, not a child) goes into env.json, key "kernel_tests".
MAX_FILES = 8
OUTPUTS = {"env": "env.json", "ceilings": "ceilings.json", "sweep": "sweep.json", "kernels": "kernels.json",
           "kernel_tests": "env.json", "bench": "bench_kernels.json", "engine": "engine.json",
           "compile": "compile.json"}

# The GPU machine's image (Python 3.12, torch, Triton, no registry) has these distributions; what
# the phases need beyond them comes as wheels in .whl/ (make gpu-wheels).
DEVICE_PYTHON = (3, 12)
DEVICE_IMAGE = {"torch", "triton", "numpy", "pyyaml", "pytest", "pytest-benchmark", "py-cpuinfo", "pytest-xdist",
                "safetensors", "psutil", "msgpack", "einops", "ninja", "packaging", "tqdm", "matplotlib",
                "nvidia-ml-py", "tensorboard", "filelock", "jinja2", "networkx", "sympy", "fsspec",
                "setuptools", "pillow", "markupsafe", "mpmath", "pip", "wheel", "iniconfig", "pluggy",
                "pygments", "execnet"}
# Distribution -> the module its wheel must hold. deepspeed's import needs torch (the device's).
DEVICE_WHEELS = {"deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic-core": "pydantic_core",
                 "annotated-types": "annotated_types", "typing-inspection": "typing_inspection",
                 "typing-extensions": "typing_extensions", "webdataset": "webdataset",
                 "braceexpand": "braceexpand"}
NEEDS_TORCH = {"deepspeed"}
