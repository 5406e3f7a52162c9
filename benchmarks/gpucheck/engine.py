"""Phase ``engine``: the training engine under DeepSpeed, the original's configuration against
the preset (and, when time is left, the preset in fp32), no torch.compile, on the same staged
synthetic batch: images/s after the warm-up steps, peak memory, and the loss curves compared.

Each run is one ``train()`` call in this phase's child process (``gpucheck/runs.py``: DeepSpeed's
timers off, matmul flags reset between runs)."""
from __future__ import annotations

import time
from pathlib import Path

from gpucheck.children import ChildResult, run_child
from gpucheck.results import compare_runs, load_json, summarise_run
from gpucheck.settings import ENGINE_LOG_EVERY, ENGINE_RUNS, ENGINE_WARMUP_STEPS, TINY, TINY_CONFIG

# Shares of the time left when each run starts: the eager fp32 original is the slowest.
_SHARES = {"original": 0.55, "fast": 0.6, "fast_fp32": 1.0}


def worker_engine(out: Path, tmp: Path, deadline: float, steps: int, batch: int, extra: list[str],
                  fast_config: str, original_config: str, tiny: bool) -> None:
    import torch
    from gpucheck.runs import Incremental, device_name, ensure_ddpm, train_run
    cuda = torch.cuda.is_available()
    log_every, warmup = ENGINE_LOG_EVERY, ENGINE_WARMUP_STEPS
    if tiny:
        fast_config = original_config = TINY_CONFIG
        steps, batch, log_every = TINY["engine_steps"], TINY["engine_batch"], TINY["engine_log_every"]
        warmup = log_every
    res = Incremental(out, {"device": device_name(), "rehearsal": not cuda, "tiny": tiny, "steps": steps,
                            "batch": batch, "log_every": log_every, "warmup_steps": warmup,
                            "data": "fixed: one synthetic uint8 global batch staged on the device, every step",
                            "deepspeed_timers": "off", "runs": {}})
    ddpm = ensure_ddpm(tmp, fast_config)
    configs = {"ORIGINAL": original_config, "FAST": fast_config}
    # The original's configuration file as it is, plus the overrides common to both runs.
    for name, (which, more) in ENGINE_RUNS.items():
        if tiny and name == "fast_fp32":
            continue
        left = deadline - time.time() - 3
        if left < 8:
            res.data["stopped"] = f"phase time spent before run {name}"
            res.save()
            break
        cap = left * _SHARES[name]
        row = train_run(tmp, f"engine-{name}", configs[which], [*more, *extra], batch, steps, log_every, cap, ddpm)
        summary = summarise_run(row.pop("records"), warmup)
        res.data["runs"][name] = {**row, **summary}
        print(f"[engine] {name}: {row['status']}, {summary.get('steps_done', 0)} steps"
              + (f", {summary['images_per_s_steady']:.1f} img/s" if summary.get("images_per_s_steady") else "")
              + (f" ({row['error']})" if row.get("error") else ""), flush=True)
        runs = res.data["runs"]
        if "fast" in runs and "original" in runs:
            res.data["comparison"] = compare_runs(runs["fast"], runs["original"], steps)
        if "fast_fp32" in runs and "original" in runs:
            res.data["comparison_fp32"] = compare_runs(runs["fast_fp32"], runs["original"], steps)
        res.save()


def run_phase(ctx) -> None:
    """Parent side: the engine worker in one child."""
    limit = ctx.limit("engine")
    a = ctx.args
    cmd = ctx.worker_cmd("engine", "--worker-out", str(ctx.out / "engine.json"), "--tmp", str(ctx.tmp / "work"),
                         "--deadline", str(time.time() + limit),
                         "--engine-steps", str(a.engine_steps), "--engine-batch", str(a.engine_batch),
                         "--engine-fast-config", a.engine_fast_config,
                         "--engine-original-config", a.engine_original_config,
                         *(["--tiny"] if a.tiny else []),
                         *[f"--engine-extra={x}" for x in a.engine_extra])
    res = run_child(cmd, ctx.log("engine"), limit, ctx.env())
    eng = load_json(ctx.out / "engine.json") or {}
    extra = {}
    if res.status == "ok" and eng.get("stopped"):   # the worker stopped itself at the phase's limit
        res = ChildResult("timeout", res.returncode, res.wall_s)
        extra["reason"] = f"stopped by its time limit: {eng['stopped']}"
    ctx.record("engine", res, limit, **extra, runs={k: v.get("status") for k, v in (eng.get("runs") or {}).items()})
