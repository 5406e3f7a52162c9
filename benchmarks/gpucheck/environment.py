"""Phase ``env``: what is installed, where ``diti_fast`` and ``diti_fast.kernels`` import from,
and what that means for the later phases (the report a dry run prints)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from gpucheck.settings import (BENCH_FILES, ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG, KERNEL_TESTS, OPTIONAL,
                               PACKAGES, PHASE_NEEDS, REPO)

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




def device_slug(env: dict | None) -> str:
    if not env or not env.get("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"]["name"].lower()).strip("-") or "gpu"


def missing_for(env: dict, phase: str) -> list[str]:
    """What ``phase`` needs that this environment lacks (packages, a failing import, files)."""
    pk = env.get("packages", {})
    miss = [m for m in PHASE_NEEDS.get(phase, []) if not pk.get(m, {}).get("found")]
    imp = env.get("import_checks") or {}
    if phase in ("sweep", "engine", "compile"):
        if "deepspeed" in imp and not imp["deepspeed"]["ok"] and "deepspeed" not in miss:
            miss.append("deepspeed (import fails)")
        miss += [f"file {f}" for f in ("diti_fast/train.py", ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG)
                 if not env.get("files", {}).get(f)]
    if phase == "bench" and "pytest_benchmark" in imp and not imp["pytest_benchmark"]["ok"]:
        miss.append("pytest_benchmark (import fails)")
    return miss


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
    for phase in [p for p in PHASE_NEEDS]:
        miss_p = missing_for(env, phase)
        if miss_p:
            problems.append(f"phase {phase} cannot run: missing {', '.join(miss_p)}")
        state = ("ready" if not miss_p else "missing " + ", ".join(miss_p))
        if not env.get("cuda"):
            state += "; no CUDA here" + (" (runs on CPU: --allow-cpu)" if allow_cpu else " (skipped)")
        lines.append(f"phase {phase}: {state}")
    if not env.get("cuda") and not allow_cpu:
        problems.append("no CUDA device: a real run here would skip every phase after env (--allow-cpu runs them "
                        "on the CPU)")
    return lines, problems
