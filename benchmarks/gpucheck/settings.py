"""What a gpu_check run does and what it checks against: phase budgets, files, goals, packages.

Pure constants (no torch), shared by the orchestrator (``benchmarks/gpu_check.py``), the phase
modules and the results analysis.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Seconds. Sum = the default --budget (9 minutes); with start-up and the wheel install of
# gpu_check.sh a device run takes about 10. The engine gets the most because its three runs
# include two torch.compile warm-ups of a minute or more each.
PHASE_BUDGETS = {"env": 30, "ceilings": 20, "kernel_tests": 70, "bench": 100, "engine": 230, "sweep": 90}
ENV_TIMEOUT_S = 90      # the env check may overrun its budget (cold imports); later phases then get less
DEFAULT_BUDGET = sum(PHASE_BUDGETS.values())
KILL_GRACE_S = 8          # SIGTERM, then this long, then SIGKILL (the whole process group)
LOG_CAP_BYTES = 2 << 20   # per phase in log.txt: head and tail kept, the middle elided

KERNEL_TESTS = ["tests/test_fused_norm.py", "tests/test_fused_loss.py",
                "tests/test_attention.py", "tests/test_masks_prefix.py", "tests/test_graph_step.py"]
# One pytest run per file, each with its own JSON: a file that hangs costs its own results only
# (pytest-benchmark writes its JSON at the end of a session). Shares of the phase's time.
BENCH_FILES = {"benchmarks/bench_fused_norm.py": 0.40, "benchmarks/bench_fused_loss.py": 0.27,
               "benchmarks/bench_attention.py": 0.23, "benchmarks/bench_latent_mask.py": 0.10}
# Short rounds: every bench file already warms up (compilation, autotuning) outside the timing,
# and each timed call runs many steps, so 5+ rounds within 0.25 s give a stable median.
BENCH_ARGS = ["--benchmark-enable", "--benchmark-only", "--benchmark-min-rounds=5",
              "--benchmark-max-time=0.25", "--benchmark-warmup=off"]

ENGINE_STEPS = 200
ENGINE_FAST_CONFIG = "configs/celeba64.yaml"
ENGINE_ORIGINAL_CONFIG = "configs/celeba64_original.yaml"
ENGINE_LOG_EVERY = 10
ENGINE_WARMUP_STEPS = 50       # steady-state images/s counts the intervals after this step
LOSS_MATCH_TOL = 0.05          # |mean loss fast - original| / original over the second half
# The engine phase's runs: name -> (config, extra overrides). fast_fp32 is the preset in fp32, so
# the kernels' and compile's own share shows apart from bf16's against the (fp32) original.
ENGINE_RUNS = {"original": ("ORIGINAL", []), "fast": ("FAST", []), "fast_fp32": ("FAST", ["run.precision=fp32"])}

# The per-GPU batch sweep (phase sweep): the engine's step (Objective + GraphStep, the preset's
# model and bf16 autocast with the fused kernels, no torch.compile) with and without the CUDA
# graph and channels_last, at the per-GPU batches of 8 ranks × global 128 up to one rank.
SWEEP_BATCHES = (16, 32, 64, 128)
SWEEP_STEPS = 20               # timed steps per configuration, after warm-up and capture

# Goals of the kernel, loss/attention and engine issues (what summary.md and the docs table check).
GOALS = {
    "gn_frac_copy": 0.80,      # fused GN fwd+bwd, 32² and 64²: fraction of copy bandwidth
    "gn_vs_eager": 3.0,
    "gn_vs_compile": 1.3,
    "loss_vs_compile": 1.2,
    "attn_sdpa_vs_math": 3.0,  # at 16x16
    "engine_speedup": 3.0,
    "engine_mfu": 0.35,        # bf16 model FLOP utilisation of the step (issue 17's target)
}

# Packages the phases need, by import name -> distribution name (for the version).
PACKAGES = {
    "torch": "torch", "triton": "triton", "numpy": "numpy", "yaml": "pyyaml", "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark", "cpuinfo": "py-cpuinfo", "xdist": "pytest-xdist",
    "safetensors": "safetensors", "deepspeed": "deepspeed", "webdataset": "webdataset",
    "braceexpand": "braceexpand", "pydantic": "pydantic", "hjson": "hjson", "msgpack": "msgpack",
    "einops": "einops", "psutil": "psutil", "ninja": "ninja", "packaging": "packaging", "tqdm": "tqdm",
    "xformers": "xformers", "matplotlib": "matplotlib",
}
OPTIONAL = {"xdist", "xformers", "matplotlib", "ninja"}   # nice to have: nothing fails without them
PHASE_NEEDS = {
    "ceilings": ["torch"],
    "kernel_tests": ["torch", "triton", "pytest"],
    "bench": ["torch", "triton", "pytest", "pytest_benchmark"],
    # train.py: deepspeed (and its needs), the data package (webdataset) for to_model_input,
    # yaml for configs, safetensors for the DDPM export and the final export.
    "engine": ["torch", "deepspeed", "pydantic", "hjson", "msgpack", "einops", "psutil", "packaging",
               "tqdm", "webdataset", "braceexpand", "yaml", "safetensors", "numpy"],
    # the engine's step in-process: configs (yaml), the data package (to_model_input), Triton
    "sweep": ["torch", "triton", "webdataset", "braceexpand", "yaml", "safetensors", "numpy"],
}
OUTPUTS = {"env": "env.json", "ceilings": "ceilings.json", "kernel_tests": "kernel_tests.json",
           "bench": "bench_kernels.json", "engine": "engine.json", "sweep": "sweep.json"}

