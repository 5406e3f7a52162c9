"""Phase ``compile`` (optional, last): the preset with torch.compile, at 16 images per GPU. Its
cold compilation (a minute or two) gets whatever the window has left; the JSON says how far it
got: the first interval's seconds (compilation included) and, if reached, the steady images/s.

In the CPU rehearsal (--tiny) TorchDynamo is disabled (TORCHDYNAMO_DISABLE=1): the phase's
plumbing runs, nothing is compiled."""
from __future__ import annotations

import time
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.results import load_json
from gpucheck.settings import COMPILE_STEPS, TINY, TINY_CONFIG


def worker_compile(out: Path, tmp: Path, deadline: float, fast_config: str, tiny: bool) -> None:
    import os
    import torch
    from gpucheck.runs import Incremental, device_name, ensure_ddpm, timed_interval, train_run
    cuda = torch.cuda.is_available()
    warm, timed = TINY["compile_steps"] if tiny else COMPILE_STEPS
    batch = TINY["sweep_batch"] if tiny else 16
    config = TINY_CONFIG if tiny else fast_config
    res = Incremental(out, {"device": device_name(), "rehearsal": not cuda, "tiny": tiny, "config": config,
                            "batch": batch, "dynamo_disabled": os.environ.get("TORCHDYNAMO_DISABLE") == "1",
                            "runs": []})
    ddpm = ensure_ddpm(tmp, config)
    # One log interval for the compile (and warm-up), then the timed one.
    cap = max(5.0, deadline - time.time() - 5)
    row = train_run(tmp, "compile", config, ["fast.compile=true"], batch, warm + timed, warm, cap, ddpm)
    recs = row.pop("records")
    row["first_interval_s"] = (recs[0]["images"] / recs[0]["images_per_s"]) if recs and recs[0].get("images_per_s") else None
    row.update(timed_interval(dict(row, records=recs), warm))
    res.data["runs"].append(row)
    res.save()
    print(f"[compile] {row['status']}: first interval {row['first_interval_s']} s, "
          f"{row.get('images_per_s', 'no steady')} img/s", flush=True)


def run_phase(ctx) -> None:
    limit = ctx.limit("compile")
    cmd = ctx.worker_cmd("compile", "--worker-out", str(ctx.out / "compile.json"), "--tmp", str(ctx.tmp / "work"),
                         "--deadline", str(time.time() + limit),
                         "--engine-fast-config", ctx.args.engine_fast_config, *(["--tiny"] if ctx.args.tiny else []))
    extra = {"TORCHDYNAMO_DISABLE": "1"} if ctx.args.tiny else None
    res = run_child(cmd, ctx.log("compile"), limit, ctx.env(extra))
    c = load_json(ctx.out / "compile.json") or {}
    ctx.record("compile", res, limit, runs={r["name"]: r["status"] for r in c.get("runs") or []})
