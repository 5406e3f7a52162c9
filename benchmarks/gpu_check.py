#!/usr/bin/env python3
"""One prepared run on one GPU that measures everything the performance claims rest on.

    bash benchmarks/gpu_check.sh                 # on the GPU machine (installs .whl/ if present)
    python benchmarks/gpu_check.py --dry-run     # any machine: the plan and the environment check
    python benchmarks/gpu_check.py --out DIR     # results into DIR (default: $OUT if set, else
                                                 # benchmarks/results/<date>-<device>/)

Phases, in order, each a separate process group with its own time limit (unused time carries
forward, so the whole run ends inside ``--budget`` seconds, 450 by default, even if a phase hangs):

1. ``env``          what is installed, where ``diti_fast`` and ``diti_fast.kernels`` come from  -> env.json
2. ``ceilings``     device-to-device copy bandwidth and bf16 / tf32 / fp32 matmul rates        -> ceilings.json
3. ``kernel_tests`` the kernel test files, compiled (TRITON_INTERPRET unset)                    -> kernel_tests.json
4. ``bench``        the kernel, loss, attention and masked-latent benchmarks (pytest-benchmark) -> bench_kernels.json
5. ``engine``       200 steps of the celeba64 preset and of the original's configuration on
                    synthetic in-memory data (train.py, one process)                            -> engine.json

then ``summary.md`` (phases and every goal, met or not) and ``log.txt`` (all phase output): 7 files,
inside the 8 a device run may bring back. ``benchmarks/plot_results.py`` turns a results directory
into figures and the table of ``docs/performance.md``.

The package need not be installed: ``diti_fast`` is imported from this checkout (its root goes on
PYTHONPATH) and ``kernels/``, which only the editable install maps to ``diti_fast.kernels``, is
mapped by a generated ``sitecustomize.py`` (a meta-path finder for that one name) in a temporary
directory that also goes on PYTHONPATH of every child process, so pytest, train.py and Inductor's
compile workers all see it. It chains to any sitecustomize it shadows.

This parent process never imports torch: a hung CUDA call can only take a child down with it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()

# Seconds. Sum = the default --budget; together with start-up and the wheel install of
# gpu_check.sh this keeps a device run under 8 minutes. The engine gets the most because the
# compiled configuration spends a minute or more in torch.compile before its first step.
PHASE_BUDGETS = {"env": 30, "ceilings": 20, "kernel_tests": 80, "bench": 120, "engine": 200}
ENV_TIMEOUT_S = 90      # the env check may overrun its budget (cold imports); later phases then get less
DEFAULT_BUDGET = sum(PHASE_BUDGETS.values())
KILL_GRACE_S = 8          # SIGTERM, then this long, then SIGKILL (the whole process group)
LOG_CAP_BYTES = 2 << 20   # per phase in log.txt: head and tail kept, the middle elided

KERNEL_TESTS = ["tests/test_fused_norm.py", "tests/test_fused_loss.py",
                "tests/test_attention.py", "tests/test_masks_prefix.py"]
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

# Goals of the kernel, loss/attention and engine issues (what summary.md and the docs table check).
GOALS = {
    "gn_frac_copy": 0.80,      # fused GN fwd+bwd, 32² and 64²: fraction of copy bandwidth
    "gn_vs_eager": 3.0,
    "gn_vs_compile": 1.3,
    "loss_vs_compile": 1.2,
    "attn_sdpa_vs_math": 3.0,  # at 16x16
    "engine_speedup": 3.0,
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
}
OUTPUTS = {"env": "env.json", "ceilings": "ceilings.json", "kernel_tests": "kernel_tests.json",
           "bench": "bench_kernels.json", "engine": "engine.json"}


# ============================================================================ import shim

SHIM_SOURCE = '''\
"""Generated by benchmarks/gpu_check.py: make ``diti_fast.kernels`` importable from {root}/kernels
without installing the package (the editable install's package-dir mapping does this otherwise).
Only that one name is answered; everything else imports as usual."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_KERNELS = {kernels!r}


class _DitiKernelsAlias(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "diti_fast.kernels":
            return None
        # submodule_search_locations makes it a package: diti_fast.kernels.x is then found by the
        # normal path finder inside {root}/kernels.
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


# First on the meta path: an installed copy of diti-fast elsewhere must not win over this checkout.
sys.meta_path.insert(0, _DitiKernelsAlias())

# Chain to the sitecustomize this file shadows (e.g. a distribution's), if any.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _mod = importlib.util.module_from_spec(_spec)
    try:
        _spec.loader.exec_module(_mod)
    except Exception as _e:  # a broken chained sitecustomize must not stop the run
        print(f"gpu_check shim: chained sitecustomize failed: {{_e!r}}", file=sys.stderr)
'''


STREAM_PLUGIN = '''\
"""pytest plugin generated by benchmarks/gpu_check.py (loaded with -p gpu_check_stream).

pytest-benchmark writes its JSON once, at the end of the session; a phase time limit that kills
pytest earlier would lose every result of the file. This appends each benchmark's entry (the same
dict pytest-benchmark puts in its JSON) to $GPU_CHECK_BENCH_STREAM as soon as its test is done."""
import json
import os

_config = None
_done = 0


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logreport(report):
    global _done
    path = os.environ.get("GPU_CHECK_BENCH_STREAM")
    session = getattr(_config, "_benchmarksession", None)
    if report.when != "teardown" or not path or session is None:
        return
    new, _done = session.benchmarks[_done:], len(session.benchmarks)
    with open(path, "a") as fh:
        for bench in new:
            if not bench.has_error:
                fh.write(json.dumps(bench.as_dict(include_data=False), default=str) + "\\n")
'''


def write_shim(directory: Path, root: Path = REPO) -> Path:
    """The PYTHONPATH directory of every child: the kernels alias and the benchmark stream plugin."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        SHIM_SOURCE.format(root=root, kernels=str(root / "kernels")))
    (directory / "gpu_check_stream.py").write_text(STREAM_PLUGIN)
    return directory


def child_env(shim_dir: Path, cuda: bool | None, extra: dict | None = None) -> dict:
    """Environment of every child: shim and checkout first on PYTHONPATH, Triton compiled on CUDA."""
    env = dict(os.environ)
    parts = [str(shim_dir), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    if cuda:
        # The kernels decide compiled vs interpreted at import: nothing may ask for the interpreter.
        env.pop("TRITON_INTERPRET", None)
        env.pop("DS_ACCELERATOR", None)
    elif cuda is False:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra or {})
    return env


# ============================================================================ child processes

@dataclass
class ChildResult:
    status: str          # ok | failed | timeout | skipped
    returncode: int | None
    wall_s: float


_ACTIVE: list[subprocess.Popen] = []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(cmd: list[str], log_path: Path, timeout: float, env: dict, cwd: Path = REPO) -> ChildResult:
    """Run ``cmd`` in its own process group (so a timeout kills its workers too), output to a log."""
    t0 = time.monotonic()
    if timeout <= 1:
        return ChildResult("timeout", None, 0.0)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _ACTIVE.append(proc)
        try:
            rc = proc.wait(timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = proc.returncode, "timeout"
            log.write(f"\n[gpu_check] killed after {timeout:.0f} s (phase time limit)\n".encode())
        finally:
            _ACTIVE.remove(proc)
    return ChildResult(status, rc, time.monotonic() - t0)


def _terminate_children(signum, frame):  # noqa: ARG001
    for proc in list(_ACTIVE):
        _kill_group(proc)
    raise SystemExit(128 + signum)


def worker_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(SELF), "--worker", name, *args]


# ============================================================================ workers (children)

def _dist_version(dist: str) -> str | None:
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:
        return None


def worker_env(out: Path, full: bool) -> None:
    """Write env.json: interpreter, torch/CUDA/device, packages, import origins, repo files."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "platform": platform.platform(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "repo": str(REPO),
                  "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "DS_ACCELERATOR", "PYTHONPATH",
                                                         "CUDA_VISIBLE_DEVICES", "OUT")}}
    pk = {}
    for mod, dist in PACKAGES.items():
        spec = importlib.util.find_spec(mod)
        pk[mod] = {"dist": dist, "found": spec is not None, "version": _dist_version(dist),
                   "origin": getattr(spec, "origin", None) if spec else None}
    info["packages"] = pk
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    info["cuda"] = cuda
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info["device"] = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                          "sm_count": p.multi_processor_count, "total_memory_bytes": p.total_memory,
                          "l2_bytes": getattr(p, "L2_cache_size", None), "count": torch.cuda.device_count()}
        with contextlib.suppress(Exception):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = q.stdout.strip()
    else:
        info["device"] = {"name": "cpu", "processor": platform.processor(), "threads": torch.get_num_threads()}
    # Where the code under test comes from: this checkout, kernels through the shim.
    origins = {}
    for mod in ("diti_fast", "diti_fast.kernels", "diti_fast.kernels.fused_norm",
                "diti_fast.kernels.fused_loss", "diti_fast.nn.attention"):
        try:
            m = importlib.import_module(mod)
            f = str(Path(m.__file__).resolve())
            origins[mod] = {"file": f, "in_repo": f.startswith(str(REPO) + os.sep), "error": None}
        except Exception as e:  # noqa: BLE001 - reported, not raised: the report is the point
            origins[mod] = {"file": None, "in_repo": False, "error": f"{type(e).__name__}: {e}"}
    info["imports"] = origins
    info["shim"] = any(type(f).__name__ == "_DitiKernelsAlias" for f in sys.meta_path)
    if full:
        # find_spec says a package is there; importing says it works (deepspeed needs pydantic etc.).
        imp = {}
        if not cuda:  # DeepSpeed picks its accelerator at import and must be told on a CPU machine
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        for mod in ("deepspeed", "webdataset", "safetensors.torch", "pytest_benchmark"):
            t0 = time.monotonic()
            try:
                importlib.import_module(mod)
                imp[mod] = {"ok": True, "s": round(time.monotonic() - t0, 2)}
            except Exception as e:  # noqa: BLE001
                imp[mod] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        info["import_checks"] = imp
    files = ["diti_fast/train.py", ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG, "benchmarks/conftest.py",
             "benchmarks/bench_engine.py", *KERNEL_TESTS, *BENCH_FILES]
    info["files"] = {f: (REPO / f).is_file() for f in files}
    info["git"] = _git_info()
    out.write_text(json.dumps(info, indent=1))


def _git_info() -> dict:
    """Read-only: commit and whether the tree differs (absent when the copy has no .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=20)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except Exception:  # noqa: BLE001
        return {}


def worker_ceilings(out: Path) -> None:
    """Copy bandwidth (the roofline of memory-bound kernels) and matmul rates (of the engine)."""
    import torch
    res: dict = {}
    if torch.cuda.is_available():
        spec = importlib.util.spec_from_file_location("_bench_conftest", REPO / "benchmarks" / "conftest.py")
        conf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conf)
        # The same function the benchmarks' copy_bandwidth fixture uses: one definition of the ceiling.
        res["device"] = torch.cuda.get_device_name()
        res["copy_GBps"] = conf.measure_copy_bandwidth()
        res["copy_method"] = "median of 20 dst.copy_(src), 1 GiB uint8, read+write bytes, CUDA events"
        dev, n, reps = "cuda", 8192, 10
    else:  # --allow-cpu: the same quantities for this CPU, small sizes
        res["device"] = "cpu"
        src = torch.empty(1 << 28, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        res["copy_GBps"] = 2 * src.numel() / sorted(times)[2] / 1e9
        res["copy_method"] = "median of 5 dst.copy_(src), 256 MiB uint8, read+write bytes, host clock"
        dev, n, reps = "cpu", 1024, 3
    mm = {}
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                               ("fp32", torch.float32, False)):
        if dev == "cpu" and label != "fp32":
            continue
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            g = torch.Generator(device=dev).manual_seed(0)
            # Random data: zeros run measurably faster on some GPUs and would flatter the ceiling.
            a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
            b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
            for _ in range(3):
                a @ b
            times = []
            for _ in range(reps):
                if dev == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    a @ b
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    t0 = time.perf_counter()
                    a @ b
                    times.append(time.perf_counter() - t0)
            med = sorted(times)[len(times) // 2]
            mm[label] = {"n": n, "median_s": med, "TFLOPs": 2 * n ** 3 / med / 1e12}
            del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    res["matmul"] = mm
    res["matmul_method"] = f"{n}x{n}x{n} random operands, 3 warm-ups, median of {reps}"
    out.write_text(json.dumps(res, indent=1))


def _perturb_zero_weights(module, std: float = 0.02) -> None:
    """The guided-diffusion UNet zero-initialises its output convolutions, so a fresh DDPM predicts
    ε̂ = 0 whatever its trunk computes; the loss curves compared by the engine phase would then not
    see the frozen trunk's numerics (bf16, fused norm, sdpa) at all. Give those weights small
    random values so its output depends on every layer."""
    import torch
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def engine_overrides(steps: int, batch: int, run_dir: Path, ddpm: Path, device: str, extra: list[str]) -> list[str]:
    return [
        "data.source=fixed",                 # synthetic: one in-memory batch, no loader, no shards
        f"data.batch_size={batch}",
        f"run.max_images={steps * batch}",
        f"init.ddpm={ddpm}",
        f"run.dir={run_dir}",
        f"run.device={device}",
        f"log.every={ENGINE_LOG_EVERY}",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every=0",                # only the final checkpoint the engine always writes
        "checkpoint.on_signal=false",        # a phase timeout kills it; no checkpoint on the way out
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def summarise_run(records: list[dict], warmup_steps: int = ENGINE_WARMUP_STEPS) -> dict:
    """Throughput, compile-inclusive first interval, peak memory and the loss curve of one run.

    Each metrics record covers the steps since the previous one: its images / its images_per_s is
    that interval's wall time. Steady state = the intervals starting at or after ``warmup_steps``
    (all but the first when the run stopped before that)."""
    recs = [r for r in records if r.get("images_per_s") and r.get("step")]
    if not recs:
        return {"steps_done": 0}
    intervals = []
    prev_step, prev_images = 0, 0
    for r in recs:
        img = r["images"] - prev_images
        intervals.append({"start": prev_step, "end": r["step"], "images": img, "s": img / r["images_per_s"]})
        prev_step, prev_images = r["step"], r["images"]
    steady = [i for i in intervals if i["start"] >= warmup_steps] or intervals[1:] or intervals
    return {
        "steps_done": recs[-1]["step"],
        "images_per_s_steady": sum(i["images"] for i in steady) / sum(i["s"] for i in steady),
        "steady_from_step": steady[0]["start"],
        "images_per_s_all": sum(i["images"] for i in intervals) / sum(i["s"] for i in intervals),
        "first_interval_s": intervals[0]["s"],
        "first_interval_steps": intervals[0]["end"],
        "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0) for r in recs),
        "loss_curve": [[r["step"], r.get("loss")] for r in recs],
    }


def compare_runs(fast: dict, original: dict, total_steps: int) -> dict:
    """Speed-up, memory ratio and loss-curve agreement (second half of the shared steps)."""
    out: dict = {}
    if fast.get("images_per_s_steady") and original.get("images_per_s_steady"):
        out["speedup"] = fast["images_per_s_steady"] / original["images_per_s_steady"]
    if fast.get("peak_memory_bytes") and original.get("peak_memory_bytes"):
        out["peak_memory_ratio"] = fast["peak_memory_bytes"] / original["peak_memory_bytes"]
    a = {s: v for s, v in fast.get("loss_curve", []) if v is not None and math.isfinite(v)}
    b = {s: v for s, v in original.get("loss_curve", []) if v is not None and math.isfinite(v)}
    shared = sorted(set(a) & set(b))
    if shared:
        half = max(shared) / 2
        late = [s for s in shared if s > half] or shared
        ma, mb = sum(a[s] for s in late) / len(late), sum(b[s] for s in late) / len(late)
        every = shared[1] - shared[0] if len(shared) > 1 else shared[0]
        out["loss_window"] = [late[0] - every + 1, late[-1]]
        out["loss_mean_fast"], out["loss_mean_original"] = ma, mb
        out["loss_rel_diff"] = abs(ma - mb) / abs(mb) if mb else float("inf")
        out["loss_max_interval_rel_diff"] = max(abs(a[s] - b[s]) / abs(b[s]) for s in shared if b[s])
        out["loss_curves_match"] = out["loss_rel_diff"] <= LOSS_MATCH_TOL
        out["loss_match_tolerance"] = LOSS_MATCH_TOL
        out["complete"] = max(shared) >= total_steps
    return out


def worker_engine(out: Path, tmp: Path, deadline: float, steps: int, batch: int | None, extra: list[str],
                  fast_config: str, original_config: str) -> None:
    """DDPM export, then train.py on the original's configuration and on the preset."""
    import torch
    from diti_fast.weights import save_export
    from diti_fast.nn import build_unet
    from diti_fast.engine.run_config import load_config, resolved_dict

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict = {"steps": steps, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "data": "fixed: one synthetic in-memory global batch reused every step (no loader)",
                    "log_every": ENGINE_LOG_EVERY, "warmup_steps": ENGINE_WARMUP_STEPS, "runs": {}}

    def save():
        out.write_text(json.dumps(result, indent=1))

    # Frozen DDPM: the preset's UNet, random weights (speed does not depend on their values; both
    # runs get the same file, so their loss curves are comparable).
    t0 = time.monotonic()
    base = load_config(fast_config, ["stage=ddpm", "data.source=fixed", *extra])
    batch = batch or base.data.batch_size
    result["batch"] = batch
    torch.manual_seed(0)
    unet = build_unet(base.model)
    _perturb_zero_weights(unet)
    ddpm = save_export(tmp / "ddpm" / "ema.safetensors", "ddpm", base.model, resolved_dict(base), unet=unet)
    del unet
    result["ddpm_export_s"] = time.monotonic() - t0
    save()

    env = dict(os.environ)
    runs = [("original", original_config), ("fast", fast_config)]
    for i, (name, config) in enumerate(runs):
        run_dir = tmp / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "diti_fast" / "train.py"), "--config", config,
               *engine_overrides(steps, batch, run_dir, ddpm, device, extra)]
        remaining = deadline - time.time() - 3
        # The original (eager) run is predictable; keep over half of what is left for the compiled
        # run, which spends its first minute or more compiling.
        limit = remaining * 0.45 if i == 0 else remaining
        print(f"[engine] {name}: {shlex.join(cmd)} (limit {limit:.0f} s)", flush=True)
        log = tmp / f"{name}.log"
        res = run_child(cmd, log, limit, env)
        text = log.read_text(errors="replace")
        sys.stdout.write(text[-20000:])
        sys.stdout.flush()
        summary = summarise_run(read_metrics(run_dir))
        result["runs"][name] = {"config": config, "command": shlex.join(cmd), "status": res.status,
                                "returncode": res.returncode, "wall_s": res.wall_s, **summary}
        if res.status != "ok":
            tail = [ln for ln in text.splitlines() if ln.strip()][-15:]
            result["runs"][name]["error_tail"] = tail
        save()
    result["comparison"] = compare_runs(result["runs"]["fast"], result["runs"]["original"], steps)
    save()


# ============================================================================ kernel tests

def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases, failures = [], []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append({"test": name, "kind": child.tag,
                                 "message": (child.get("message") or "")[:400],
                                 "detail": (child.text or "")[-1500:]})
            elif child.tag == "skipped":
                outcome = "skipped"
        cases.append({"test": name, "outcome": outcome, "s": float(tc.get("time") or 0)})
    totals = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    totals["total"] = len(cases)
    slow = sorted(cases, key=lambda c: -c["s"])[:10]
    return {"totals": totals, "failures": failures, "slowest": slow}


_VERBOSE_LINE = re.compile(r"(?:\[gw\d+\]\s+)?(?:\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
                           r"|(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose_log(text: str) -> dict:
    """Fallback when pytest was killed before writing its junit file: read its -v lines."""
    seen: dict[str, str] = {}
    for m in _VERBOSE_LINE.finditer(text):
        outcome, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[name] = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "XPASS": "passed",
                      "XFAIL": "skipped", "SKIPPED": "skipped"}[outcome]
    totals = {k: sum(v == k for v in seen.values()) for k in ("passed", "failed", "error", "skipped")}
    totals["total"] = len(seen)
    out = {"totals": totals, "failures": [{"test": n, "kind": o} for n, o in seen.items() if o in ("failed", "error")],
           "slowest": [], "from_log": True}
    # -v prints a test's name when it starts: the last name without an outcome is what was running.
    started = re.findall(r"^(\S+::\S+) *$", text, flags=re.M)
    if started and started[-1] not in seen:
        out["running_when_stopped"] = started[-1]
    return out


# ============================================================================ results analysis
# Pure Python (no torch): used by summary.md here and by plot_results.py for the docs table.

def load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bench_entries(bench: dict | None) -> list[dict]:
    """pytest-benchmark JSON -> [{file, test, params, median, extra}]."""
    out = []
    for b in (bench or {}).get("benchmarks", []):
        full = b.get("fullname", "")
        out.append({"file": Path(full.split("::")[0]).name, "test": b.get("name", ""),
                    "params": b.get("params") or {}, "median": (b.get("stats") or {}).get("median"),
                    "extra": b.get("extra_info") or {}})
    return out


def bench_groups(entries: list[dict], file: str, variant_key: str) -> dict[tuple, dict[str, dict]]:
    """{(other params as sorted (k, v) pairs): {variant: entry}} for one bench file."""
    groups: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        if e["file"] != file or variant_key not in e["params"]:
            continue
        key = tuple(sorted((k, str(v)) for k, v in e["params"].items() if k != variant_key))
        groups.setdefault(key, {})[str(e["params"][variant_key])] = e
    return groups


def ratio(slow: dict | None, fast: dict | None) -> float | None:
    if not slow or not fast or not slow.get("median") or not fast.get("median"):
        return None
    return slow["median"] / fast["median"]


def fmt_x(v: float) -> str:
    return f"{v:.2f}×"


def fmt_pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def fmt_num(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def fmt_rate(v: float) -> str:
    """TFLOP/s: one decimal on a GPU, three significant digits for a CPU's fraction of one."""
    return fmt_num(v, 1) if v >= 10 else f"{v:.3g}"


def fmt_gib(v: float) -> str:
    return f"{v / 2 ** 30:.2f} GiB"


def _row(area, case, metric, measured, goal="", met=None) -> dict:
    return {"area": area, "case": case, "metric": metric, "measured": measured, "goal": goal,
            "met": None if met is None else bool(met)}


def _res_of(shape: str) -> int | None:
    m = re.search(r"_(\d+)x\d+$", shape)
    return int(m.group(1)) if m else None


def goal_rows(results: dict) -> list[dict]:
    """Every goal of the kernel, loss/attention and engine issues, measured or marked missing.

    ``results``: {"env", "ceilings", "kernel_tests", "bench", "engine"} as loaded from a results
    directory (any may be None). Rows whose goal needs data that is absent say so."""
    rows: list[dict] = []
    ceil = results.get("ceilings") or {}
    on_gpu = bool((results.get("env") or {}).get("cuda"))
    if ceil.get("copy_GBps"):
        rows.append(_row("Ceiling", "device-to-device copy", "bandwidth (read+write)",
                         f"{fmt_num(ceil['copy_GBps'], 0)} GB/s"))
    for label in ("bf16", "tf32", "fp32"):
        mm = (ceil.get("matmul") or {}).get(label)
        if mm:
            rows.append(_row("Ceiling", f"{mm['n']}³ matmul {label}", "rate", f"{fmt_rate(mm['TFLOPs'])} TFLOP/s"))

    kt = results.get("kernel_tests")
    if kt and kt.get("totals"):
        t = kt["totals"]
        bad = t.get("failed", 0) + t.get("error", 0)
        mode = "compiled" if kt.get("compiled") else "interpreted"
        rows.append(_row("Kernel tests", f"{t.get('total', 0)} tests, {mode}", "passed / failed / skipped",
                         f"{t.get('passed', 0)} / {bad} / {t.get('skipped', 0)}", "all pass",
                         bad == 0 and t.get("passed", 0) > 0 and kt.get("status") == "ok"))

    entries = bench_entries(results.get("bench"))
    copy = ceil.get("copy_GBps")
    # Adaptive GroupNorm: fwd+bwd at 32² and 64² against the copy bandwidth, eager and compile.
    agn = bench_groups(entries, "bench_fused_norm.py", "variant")
    agn_goal = sorted((k for k in agn if dict(k).get("mode") == "fwd_bwd" and _res_of(dict(k)["shape"]) in (32, 64)),
                      key=lambda k: (dict(k)["dtype"], dict(k)["shape"]))
    for key in agn_goal:
        p, g = dict(key), agn[key]
        tri = g.get("triton")
        case = f"{p['shape']} {p['dtype']} fwd+bwd"
        if not tri:
            continue
        frac = tri["extra"].get("fraction_of_copy")
        if frac is None and copy and tri["extra"].get("min_traffic_GBps"):
            frac = tri["extra"]["min_traffic_GBps"] / copy
        if frac is not None:
            gbps = tri["extra"].get("min_traffic_GBps")
            rows.append(_row("GroupNorm", case, "fraction of copy bandwidth",
                             fmt_pct(frac) + (f" ({fmt_num(gbps, 0)} GB/s)" if gbps else ""),
                             f"≥ {fmt_pct(GOALS['gn_frac_copy'])}", frac >= GOALS["gn_frac_copy"]))
        for base, goal in (("eager", "gn_vs_eager"), ("compile", "gn_vs_compile")):
            r = ratio(g.get(base), tri)
            if r is not None:
                rows.append(_row("GroupNorm", case, f"speed-up over {base}", fmt_x(r), f"≥ {fmt_x(GOALS[goal])}",
                                 r >= GOALS[goal]))
    # DiTi loss: the Triton kernel against torch.compile of the same outputs.
    loss = bench_groups(entries, "bench_fused_loss.py", "variant")
    for key in sorted(loss, key=lambda k: (dict(k)["dtype"], dict(k)["shape"])):
        p, g = dict(key), loss[key]
        case = f"{p['shape']} {p['dtype']} fwd+bwd"
        r = ratio(g.get("compile"), g.get("triton"))
        if r is not None:
            rows.append(_row("DiTi loss", case, "speed-up over compile", fmt_x(r),
                             f"≥ {fmt_x(GOALS['loss_vs_compile'])}", r >= GOALS["loss_vs_compile"]))
        elif not on_gpu and g.get("compile") and g.get("eager"):
            rows.append(_row("DiTi loss", case + " (CPU)", "compile over eager", fmt_x(ratio(g["eager"], g["compile"]))))
    # Attention: sdpa against math at the 16x16 levels (legacy layout; the new one costs the same copy).
    attn = bench_groups(entries, "bench_attention.py", "backend")
    for key in sorted(attn, key=lambda k: (dict(k)["level"], dict(k)["scope"], dict(k)["dtype"])):
        p, g = dict(key), attn[key]
        if not p["level"].endswith("16x16") or p.get("new_order") not in ("False", None):
            continue
        r = ratio(g.get("math"), g.get("sdpa"))
        if r is None:
            continue
        case = f"{p['level']} {p['scope']} {p['dtype']}"
        if on_gpu and p["dtype"] == "bf16":
            rows.append(_row("Attention", case, "sdpa over math", fmt_x(r), f"≥ {fmt_x(GOALS['attn_sdpa_vs_math'])}",
                             r >= GOALS["attn_sdpa_vs_math"]))
        elif not on_gpu:
            rows.append(_row("Attention", case + " (CPU)", "sdpa over math", fmt_x(r)))
    # Engine: 200 steps, preset vs the original's configuration.
    eng = results.get("engine") or {}
    runs = eng.get("runs") or {}
    f, o = runs.get("fast") or {}, runs.get("original") or {}
    cmp_ = eng.get("comparison") or {}
    label = f"celeba64, {eng.get('steps', '?')} steps, batch {eng.get('batch', '?')}"
    if f.get("images_per_s_steady") and o.get("images_per_s_steady"):
        sp = f["images_per_s_steady"] / o["images_per_s_steady"]
        steps = eng.get("steps")
        done = lambda r: r.get("steps_done") or max((st for st, _ in r.get("loss_curve") or []), default=0)  # noqa: E731
        short = [f"{k} {done(r)}/{steps} steps" for k, r in (("original", o), ("preset", f))
                 if steps and done(r) < steps]
        rows.append(_row("Engine", label, "images/s, preset vs original config",
                         f"{fmt_x(sp)} ({fmt_num(f['images_per_s_steady'])} vs {fmt_num(o['images_per_s_steady'])} img/s)"
                         + (f" (incomplete: {', '.join(short)})" if short else ""),
                         f"≥ {fmt_x(GOALS['engine_speedup'])}", sp >= GOALS["engine_speedup"] and not short))
    elif runs:
        rows.append(_row("Engine", label, "images/s, preset vs original config",
                         f"not measured (original: {o.get('status', 'absent')}, preset: {f.get('status', 'absent')})",
                         f"≥ {fmt_x(GOALS['engine_speedup'])}", False))
    if f.get("peak_memory_bytes") and o.get("peak_memory_bytes"):
        rows.append(_row("Engine", label, "peak memory, preset vs original",
                         f"{fmt_gib(f['peak_memory_bytes'])} vs {fmt_gib(o['peak_memory_bytes'])}", "lower",
                         f["peak_memory_bytes"] < o["peak_memory_bytes"]))
    if "loss_rel_diff" in cmp_:
        w = cmp_.get("loss_window", ["?", "?"])
        rows.append(_row("Engine", label, f"loss, steps {w[0]}-{w[1]} (mean)",
                         f"{cmp_['loss_mean_fast']:.4f} vs {cmp_['loss_mean_original']:.4f} "
                         f"({fmt_pct(cmp_['loss_rel_diff'])} apart)",
                         f"≤ {fmt_pct(cmp_.get('loss_match_tolerance', LOSS_MATCH_TOL))} apart",
                         cmp_["loss_curves_match"]))
    if f.get("first_interval_s") and o.get("first_interval_s"):
        rows.append(_row("Engine", label, f"first {f.get('first_interval_steps')} steps incl. compilation",
                         f"{f['first_interval_s']:.1f} s vs {o['first_interval_s']:.1f} s"))
    if on_gpu:
        # A goal whose measurement is missing (phase skipped, failed or cut short) is a row too.
        wanted = [("Kernel tests", "passed / failed / skipped", "all pass"),
                  ("GroupNorm", "fwd+bwd at 32² and 64² vs copy, eager, compile",
                   f"≥ {fmt_pct(GOALS['gn_frac_copy'])}, ≥ {fmt_x(GOALS['gn_vs_eager'])}, ≥ {fmt_x(GOALS['gn_vs_compile'])}"),
                  ("DiTi loss", "speed-up over compile", f"≥ {fmt_x(GOALS['loss_vs_compile'])}"),
                  ("Attention", "sdpa over math at 16x16", f"≥ {fmt_x(GOALS['attn_sdpa_vs_math'])}"),
                  ("Engine", "images/s, preset vs original config", f"≥ {fmt_x(GOALS['engine_speedup'])}")]
        for area, metric, goal in wanted:
            if not any(r["area"] == area and r["met"] is not None for r in rows):
                rows.append(_row(area, "-", metric, "not measured (see summary.md)", goal, False))
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "_No measurements in these results._\n"
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| area | case | metric | measured | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['area']} | {r['case']} | {r['metric']} | {r['measured']} | {r['goal']} | {mark[r['met']]} |")
    return "\n".join(lines) + "\n"


def load_results(directory: Path) -> dict:
    d = Path(directory)
    return {"env": load_json(d / "env.json"), "ceilings": load_json(d / "ceilings.json"),
            "kernel_tests": load_json(d / "kernel_tests.json"), "bench": load_json(d / "bench_kernels.json"),
            "engine": load_json(d / "engine.json")}


# ============================================================================ orchestration (parent)

def device_slug(env: dict | None) -> str:
    if not env or not env.get("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"]["name"].lower()).strip("-") or "gpu"


def missing_for(env: dict, phase: str) -> list[str]:
    pk = env.get("packages", {})
    miss = [m for m in PHASE_NEEDS.get(phase, []) if not pk.get(m, {}).get("found")]
    imp = env.get("import_checks") or {}
    if phase == "engine":
        miss += [m for m in ("deepspeed", "webdataset") if m in imp and not imp[m]["ok"] and m not in miss]
        miss += [f"file {f}" for f in ("diti_fast/train.py", ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG)
                 if not env.get("files", {}).get(f)]
    if phase == "bench" and "pytest_benchmark" in imp and not imp["pytest_benchmark"]["ok"]:
        miss.append("pytest_benchmark (import fails)")
    return miss


def phase_budgets(args) -> dict[str, float]:
    """Seconds per selected phase (env always), scaled so that they add up to --budget."""
    sel = ["env"] + [p for p in PHASE_BUDGETS if p in args.phases and p != "env"]
    total = sum(PHASE_BUDGETS[p] for p in sel)
    return {p: PHASE_BUDGETS[p] * args.budget / total for p in sel}


def plan_lines(args, out_desc: str) -> list[str]:
    tests = [t for t in KERNEL_TESTS if (REPO / t).is_file()]
    benches = [b for b in BENCH_FILES if (REPO / b).is_file()]
    b = phase_budgets(args)
    lines = [f"output directory: {out_desc}",
             f"time budget: {args.budget:.0f} s in all; per phase (unused time carries forward): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in b.items()),
             f"1. env          -> env.json           packages, CUDA device, import origins (shim: "
             f"diti_fast.kernels -> {REPO / 'kernels'})",
             "2. ceilings     -> ceilings.json      copy bandwidth (benchmarks/conftest.py), 8192³ matmul bf16/tf32/fp32",
             f"3. kernel_tests -> kernel_tests.json  python -m pytest -v {' '.join(tests)}"
             + (f" -n {args.test_workers} (if pytest-xdist)" if args.test_workers else "")
             + " (TRITON_INTERPRET unset: compiled)",
             f"4. bench        -> bench_kernels.json one pytest run per file: {' '.join(benches)} "
             f"{' '.join(BENCH_ARGS)}",
             f"5. engine       -> engine.json        random-weight celeba64 DDPM export, then {args.engine_steps} "
             f"steps each of python diti_fast/train.py --config {args.engine_original_config} / "
             f"--config {args.engine_fast_config} with "
             + " ".join(engine_overrides(args.engine_steps, args.engine_batch or 128, Path("<tmp>/run-NAME"),
                                         Path("<tmp>/ddpm/ema.safetensors"), "cuda", args.engine_extra)),
             "then summary.md (phases + goals) and log.txt (all output): 7 files",
             ]
    if not (REPO / "benchmarks/bench_engine.py").is_file():
        lines.append("note: benchmarks/bench_engine.py does not exist; the engine phase drives train.py itself")
    return lines


def env_report_lines(env: dict, allow_cpu: bool) -> tuple[list[str], list[str]]:
    """(report lines, problems that would stop or degrade a device run)."""
    lines, problems = [], []
    dev = env.get("device", {})
    lines.append(f"python {env.get('python')} ({env.get('executable')}), {env.get('platform')}")
    lines.append(f"torch {env.get('torch')} (CUDA build {env.get('torch_cuda')}), triton "
                 f"{env['packages']['triton']['version']}; CUDA available: {env.get('cuda')}"
                 + (f", {dev.get('name')} x{dev.get('count')}, {dev.get('sm_count')} SMs, "
                    f"{dev.get('total_memory_bytes', 0) / 2 ** 30:.0f} GiB" if env.get("cuda") else ""))
    for mod, o in env.get("imports", {}).items():
        where = o["file"] if o["file"] else o["error"]
        flag = "this checkout" if o["in_repo"] else "NOT this checkout"
        lines.append(f"import {mod}: {where} [{flag if o['file'] else 'FAILED'}]")
        if not o["in_repo"]:
            problems.append(f"{mod} does not import from this checkout ({where})")
    pkgs = env.get("packages", {})
    have = [f"{p['dist']} {p['version'] or ''}".strip() for p in pkgs.values() if p["found"]]
    miss = [p["dist"] for m, p in pkgs.items() if not p["found"] and m not in OPTIONAL]
    opt = [p["dist"] for m, p in pkgs.items() if not p["found"] and m in OPTIONAL]
    lines.append("packages found: " + ", ".join(have))
    lines.append("packages missing: " + (", ".join(miss) or "none")
                 + (f"; optional, missing: {', '.join(opt)}" if opt else ""))
    for mod, c in (env.get("import_checks") or {}).items():
        lines.append(f"import check {mod}: " + ("ok" if c["ok"] else c["error"]))
    for phase in ("ceilings", "kernel_tests", "bench", "engine"):
        miss_p = missing_for(env, phase)
        if miss_p:
            problems.append(f"phase {phase} cannot run: missing {', '.join(miss_p)}")
        state = ("ready" if not miss_p else "missing " + ", ".join(miss_p))
        if not env.get("cuda"):
            state += "; no CUDA here" + (" (runs on CPU: --allow-cpu)" if allow_cpu else " (skipped)")
        lines.append(f"phase {phase}: {state}")
    if not env.get("cuda") and not allow_cpu:
        problems.append("no CUDA device: a real run would skip phases 2-5 (use --allow-cpu to run them on CPU)")
    return lines, problems


def _capped(text: str, cap: int = LOG_CAP_BYTES) -> str:
    if len(text) <= cap:
        return text
    half = cap // 2
    return text[:half] + f"\n[... {len(text) - cap} characters elided ...]\n" + text[-half:]


class Run:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.shim = write_shim(self.tmp / "shim")
        self.out: Path | None = None
        self.env_info: dict | None = None
        self.phases: dict[str, dict] = {}
        self.started = time.time()
        self.deadline = self.started + args.budget
        self.budgets = phase_budgets(args)
        self.slack = 0.0
        self.command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(
            ["python", str(SELF.relative_to(REPO)), *sys.argv[1:]])

    def env(self, extra: dict | None = None) -> dict:
        cuda = None if self.env_info is None else bool(self.env_info.get("cuda"))
        return child_env(self.shim, cuda, extra)

    def log(self, phase: str) -> Path:
        return self.tmp / f"{phase}.log"

    def limit(self, phase: str) -> float:
        """This phase's budget, plus what earlier phases left unused, never past the deadline
        minus the budgets of the phases still to come."""
        names = list(self.budgets)
        later = sum(self.budgets[n] for n in names[names.index(phase) + 1:])
        own = self.budgets[phase] + self.slack
        return max(0.0, min(own, self.deadline - time.time() - later))

    def record(self, phase: str, res: ChildResult, limit: float, budget: float | None = None, **extra) -> None:
        self.phases[phase] = {"status": res.status, "returncode": res.returncode, "wall_s": round(res.wall_s, 1),
                              "limit_s": round(limit, 1), **extra}
        # What this phase left of its own share goes to the next one.
        self.slack = max(0.0, (limit if budget is None else budget) - res.wall_s)
        print(f"[gpu_check] {phase}: {res.status} in {res.wall_s:.0f} s (limit {limit:.0f} s)", flush=True)
        if res.status not in ("ok", "skipped"):
            tail = self.log(phase).read_text(errors="replace").splitlines()[-25:] if self.log(phase).exists() else []
            print("\n".join("    " + ln for ln in tail), flush=True)

    def skip(self, phase: str, why: str) -> None:
        self.phases[phase] = {"status": "skipped", "reason": why}
        self.slack += self.budgets.get(phase, 0.0)  # its time goes to the next phase
        print(f"[gpu_check] {phase}: skipped ({why})", flush=True)

    # -- phases
    def run_env(self, full: bool) -> dict | None:
        limit = ENV_TIMEOUT_S
        path = self.tmp / "env.json"
        # The first child runs before CUDA is known: leave TRITON_INTERPRET etc. as they are.
        cmd = worker_cmd("env", "--worker-out", str(path)) + (["--full"] if full else [])
        res = run_child(cmd, self.log("env"), limit, self.env())
        self.env_info = load_json(path)
        self.record("env", res, limit, budget=self.budgets["env"])
        return self.env_info

    def run_ceilings(self) -> None:
        limit = self.limit("ceilings")
        res = run_child(worker_cmd("ceilings", "--worker-out", str(self.out / "ceilings.json")),
                        self.log("ceilings"), limit, self.env())
        self.record("ceilings", res, limit)

    def run_kernel_tests(self) -> None:
        limit = self.limit("kernel_tests")
        tests = [t for t in KERNEL_TESTS if (REPO / t).is_file()]
        junit = self.tmp / "kernel_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_family=xunit2", *tests]
        pk = self.env_info["packages"]
        if self.args.test_workers and pk.get("xdist", {}).get("found"):
            # Triton compiles each kernel specialisation on the CPU: several workers keep the cores busy.
            cmd += ["-n", str(self.args.test_workers)]
        res = run_child(cmd, self.log("kernel_tests"), limit, self.env())
        if junit.is_file():
            summary = parse_junit(junit)
        else:
            summary = parse_verbose_log(self.log("kernel_tests").read_text(errors="replace"))
        # pytest exit 1 = some test failed: the phase ran; the totals say what failed.
        summary.update(status=res.status, returncode=res.returncode, files=tests, command=shlex.join(cmd),
                       compiled=bool(self.env_info.get("cuda")), wall_s=res.wall_s,
                       device=self.env_info.get("device", {}).get("name"))
        (self.out / "kernel_tests.json").write_text(json.dumps(summary, indent=1))
        self.record("kernel_tests", res, limit, totals=summary["totals"])

    def run_bench(self) -> None:
        limit = self.limit("bench")
        t_end = time.time() + limit
        files = [f for f in BENCH_FILES if (REPO / f).is_file()]
        merged: dict = {"benchmarks": [], "runs": []}
        t0, statuses = time.monotonic(), []
        for i, f in enumerate(files):
            share = BENCH_FILES[f] / sum(BENCH_FILES[g] for g in files[i:])
            sub = max(0.0, (t_end - time.time()) * share)
            js = self.tmp / f"bench-{Path(f).stem}.json"
            stream = self.tmp / f"bench-{Path(f).stem}.jsonl"
            cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rfE", "-p", "no:cacheprovider",
                   "-p", "gpu_check_stream", f, *BENCH_ARGS, f"--benchmark-json={js}"]
            res = run_child(cmd, self.log("bench"), sub, self.env({"GPU_CHECK_BENCH_STREAM": str(stream)}))
            data = load_json(js) or {}
            found = data.get("benchmarks", [])
            partial = not found and res.status != "ok" and stream.is_file()
            if partial:  # killed before pytest-benchmark wrote its JSON: what finished was streamed
                found = [json.loads(ln) for ln in stream.read_text().splitlines() if ln.strip()]
            for k in ("machine_info", "commit_info", "datetime", "version"):
                if data.get(k) is not None:
                    merged.setdefault(k, data[k])
            merged["benchmarks"] += found
            merged["runs"].append({"file": f, "status": res.status, "returncode": res.returncode,
                                   "wall_s": round(res.wall_s, 1), "limit_s": round(sub, 1), "partial": partial,
                                   "benchmarks": len(found), "command": shlex.join(cmd)})
            statuses.append(res.status)
        (self.out / "bench_kernels.json").write_text(json.dumps(merged, indent=1))
        status = "ok" if all(s == "ok" for s in statuses) else \
            ("timeout" if "timeout" in statuses else "failed")
        self.record("bench", ChildResult(status, None, time.monotonic() - t0), limit,
                    benchmarks=len(merged["benchmarks"]), files={r["file"]: r["status"] for r in merged["runs"]})

    def run_engine(self) -> None:
        limit = self.limit("engine")
        a = self.args
        cmd = worker_cmd("engine", "--worker-out", str(self.out / "engine.json"), "--tmp", str(self.tmp / "engine"),
                         "--deadline", str(time.time() + limit - KILL_GRACE_S - 2),
                         "--engine-steps", str(a.engine_steps),
                         "--engine-fast-config", a.engine_fast_config,
                         "--engine-original-config", a.engine_original_config,
                         *(["--engine-batch", str(a.engine_batch)] if a.engine_batch else []),
                         *[f"--engine-extra={x}" for x in a.engine_extra])
        res = run_child(cmd, self.log("engine"), limit, self.env())
        eng = load_json(self.out / "engine.json") or {}
        self.record("engine", res, limit, runs={k: v.get("status") for k, v in (eng.get("runs") or {}).items()})

    # -- outputs
    def write_summary(self) -> None:
        if self.out is None:
            return
        env = self.env_info or {}
        if env:
            env = dict(env, phases=self.phases, command=self.command, budget_s=self.args.budget,
                       started=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds"),
                       elapsed_s=round(time.time() - self.started, 1),
                       result_dir_name=f"{dt.date.fromtimestamp(self.started).isoformat()}-{device_slug(env)}")
            (self.out / "env.json").write_text(json.dumps(env, indent=1))
        res = load_results(self.out)
        res["env"] = env
        lines = [f"# gpu_check summary: {env.get('device', {}).get('name', '?')}",
                 "", f"- date: {env.get('started', '?')} (UTC), elapsed {env.get('elapsed_s', '?')} s of {self.args.budget:.0f} s",
                 f"- command: `{self.command}`",
                 f"- torch {env.get('torch')}, triton {env.get('packages', {}).get('triton', {}).get('version')}, "
                 f"python {env.get('python')}" + (f", commit {env['git']['commit'][:12]}" + (" (dirty)" if env['git'].get('dirty') else "")
                                                   if env.get("git", {}).get("commit") else ""),
                 "", "## Phases", "", "| phase | status | seconds | limit | notes |", "|---|---|---|---|---|"]
        for name in PHASE_BUDGETS:
            p = self.phases.get(name)
            if not p:
                continue
            note = p.get("reason") or ""
            if "totals" in p:
                note = ", ".join(f"{k} {v}" for k, v in p["totals"].items())
            if "files" in p:
                note = f"{p.get('benchmarks', 0)} benchmarks; " + ", ".join(f"{Path(k).stem}: {v}" for k, v in p["files"].items())
            if "runs" in p:
                note = ", ".join(f"{k}: {v}" for k, v in p["runs"].items())
            lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '')} | {p.get('limit_s', '')} | {note} |")
        miss = [PACKAGES[m] for m, v in env.get("packages", {}).items() if not v["found"]]
        lines += ["", f"Missing packages: {', '.join(miss) or 'none'}.", "", "## Goals", "", rows_to_markdown(goal_rows(res))]
        kt = res.get("kernel_tests") or {}
        if kt.get("failures"):
            lines += ["## Kernel test failures", ""] + [f"- `{f['test']}`: {f.get('message', f['kind'])}" for f in kt["failures"][:30]]
        eng = res.get("engine") or {}
        for name, r in (eng.get("runs") or {}).items():
            if r.get("error_tail"):
                lines += ["", f"## Engine run `{name}`: {r['status']}", "", "```", *r["error_tail"], "```"]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        with open(self.out / "log.txt", "w") as fh:
            for name in PHASE_BUDGETS:
                p = self.log(name)
                if p.exists():
                    fh.write(f"\n===== {name} =====\n")
                    fh.write(_capped(p.read_text(errors="replace")))

    def execute(self) -> int:
        a = self.args
        print(f"[gpu_check] repo {REPO}; budget {a.budget:.0f} s; phases {' '.join(a.phases)}", flush=True)
        env = self.run_env(full=True)
        if env is None:
            print("[gpu_check] the environment check failed; see below", flush=True)
            print(self.log("env").read_text(errors="replace")[-5000:])
            return 2
        self.out = resolve_out(a, env)
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"[gpu_check] results -> {self.out}", flush=True)
        lines, problems = env_report_lines(env, a.allow_cpu)
        print("\n".join("    " + ln for ln in lines), flush=True)
        self.write_summary()
        cuda = bool(env.get("cuda"))
        for phase in ("ceilings", "kernel_tests", "bench", "engine"):
            if phase not in a.phases:
                continue
            if not cuda and not a.allow_cpu:
                self.skip(phase, "no CUDA device (--allow-cpu runs it on the CPU)")
                continue
            miss = missing_for(env, phase)
            if miss:
                self.skip(phase, "missing " + ", ".join(miss))
                continue
            print(f"[gpu_check] {phase}: start (limit {self.limit(phase):.0f} s)", flush=True)
            try:
                getattr(self, f"run_{phase}")()
            except Exception as e:  # noqa: BLE001 - one phase's bug must not cost the others
                self.phases[phase] = {"status": "failed", "reason": f"gpu_check error: {type(e).__name__}: {e}"}
                print(f"[gpu_check] {phase}: gpu_check error {e!r}", flush=True)
            self.write_summary()
        self.write_summary()
        print("\n" + (self.out / "summary.md").read_text(), flush=True)
        bad = [p for p, v in self.phases.items() if v["status"] not in ("ok", "skipped")]
        return 1 if bad else 0

    def dry_run(self) -> int:
        a = self.args
        out_desc = str(a.out) if a.out else (f"$OUT ({os.environ['OUT']})" if os.environ.get("OUT") else
                                             "benchmarks/results/<date>-<device>/")
        print("gpu_check --dry-run: the plan and an environment check; nothing is measured or written\n")
        print(f"repo: {REPO}")
        for ln in plan_lines(a, out_desc):
            print(ln)
        env = self.run_env(full=False)
        print("\nenvironment (as the children of a real run see it):")
        if env is None:
            print("  the environment check failed:\n" + self.log("env").read_text(errors="replace")[-5000:])
            return 1
        lines, problems = env_report_lines(env, a.allow_cpu)
        print("\n".join("  " + ln for ln in lines))
        if not a.out and not os.environ.get("OUT"):
            print(f"\nresults would go to benchmarks/results/{dt.date.today().isoformat()}-{device_slug(env)}/")
        print("\nproblems for a device run:" if problems else "\nno problems found")
        for p in problems:
            print(f"  - {p}")
        # Exit 1 only when this checkout itself is unusable (imports fail); a CPU machine lacking
        # CUDA or the engine's packages is the expected state of a dry run.
        broken = [m for m, o in env.get("imports", {}).items() if not o["in_repo"]]
        return 1 if broken else 0

    def cleanup(self) -> None:
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"[gpu_check] temporary files kept in {self.tmp}")


def resolve_out(args, env: dict) -> Path:
    if args.out:
        return Path(args.out).resolve()
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]).resolve()
    return REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-{device_slug(env)}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the environment; run nothing")
    ap.add_argument("--out", help="results directory (default: $OUT if set, else benchmarks/results/<date>-<device>/)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds for all phases (default {DEFAULT_BUDGET})")
    ap.add_argument("--phases", nargs="+", default=list(PHASE_BUDGETS)[1:], choices=list(PHASE_BUDGETS)[1:],
                    help="which phases after env to run (default: all)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run the phases without CUDA (kernels interpreted; for testing this script)")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers for kernel tests (0: none)")
    ap.add_argument("--engine-steps", type=int, default=ENGINE_STEPS)
    ap.add_argument("--engine-batch", type=int, default=0, help="global batch (default: the preset's)")
    ap.add_argument("--engine-fast-config", default=ENGINE_FAST_CONFIG)
    ap.add_argument("--engine-original-config", default=ENGINE_ORIGINAL_CONFIG)
    ap.add_argument("--engine-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for both runs (repeatable)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, run dirs)")
    # internal: child workers
    ap.add_argument("--worker", choices=["env", "ceilings", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        out = Path(args.worker_out)
        if args.worker == "env":
            worker_env(out, args.full)
        elif args.worker == "ceilings":
            worker_ceilings(out)
        else:
            signal.signal(signal.SIGTERM, _terminate_children)
            worker_engine(out, Path(args.tmp), args.deadline, args.engine_steps, args.engine_batch or None,
                          args.engine_extra, args.engine_fast_config, args.engine_original_config)
        return 0
    run = Run(args)
    signal.signal(signal.SIGTERM, _terminate_children)
    try:
        return run.dry_run() if args.dry_run else run.execute()
    finally:
        if not args.dry_run:
            with contextlib.suppress(Exception):
                run.write_summary()
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
