"""Phase ``engine``: the training engine itself, through ``diti_fast/train.py``, on synthetic data:
the original's configuration against the preset (and the fp32 preset), each a child process."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.results import compare_runs, load_json, summarise_run
from gpucheck.settings import ENGINE_LOG_EVERY, ENGINE_RUNS, ENGINE_WARMUP_STEPS, KILL_GRACE_S, REPO

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


def worker_engine(out: Path, tmp: Path, deadline: float, steps: int, batch: int | None, extra: list[str],
                  fast_config: str, original_config: str) -> None:
    """DDPM export, then train.py on the original's configuration, the preset and the preset in fp32."""
    import torch
    from diti_fast.weights import save_export
    from diti_fast.nn import build_unet
    from diti_fast.engine.config_files import load_config, resolved_dict

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
    configs = {"ORIGINAL": original_config, "FAST": fast_config}
    # Shares of the time left: the original (eager fp32) run is predictable; each compiled run
    # spends its first minute or more compiling.
    shares = {"original": 0.36, "fast": 0.5, "fast_fp32": 1.0}
    for name, (which, more) in ENGINE_RUNS.items():
        config = configs[which]
        run_dir = tmp / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "diti_fast" / "train.py"), "--config", config,
               *engine_overrides(steps, batch, run_dir, ddpm, device, [*extra, *more])]
        remaining = deadline - time.time() - 3
        limit = remaining * shares.get(name, 1.0)
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
    if "fast_fp32" in result["runs"]:
        result["comparison_fp32"] = compare_runs(result["runs"]["fast_fp32"], result["runs"]["original"], steps)
    save()


def run_phase(ctx) -> None:
    """Parent side: the engine worker in one child (it runs train.py children of its own)."""
    limit = ctx.limit("engine")
    a = ctx.args
    cmd = ctx.worker_cmd("engine", "--worker-out", str(ctx.out / "engine.json"), "--tmp", str(ctx.tmp / "engine"),
                     "--deadline", str(time.time() + limit - KILL_GRACE_S - 2),
                     "--engine-steps", str(a.engine_steps),
                     "--engine-fast-config", a.engine_fast_config,
                     "--engine-original-config", a.engine_original_config,
                     *(["--engine-batch", str(a.engine_batch)] if a.engine_batch else []),
                     *[f"--engine-extra={x}" for x in a.engine_extra])
    res = run_child(cmd, ctx.log("engine"), limit, ctx.env())
    eng = load_json(ctx.out / "engine.json") or {}
    ctx.record("engine", res, limit, runs={k: v.get("status") for k, v in (eng.get("runs") or {}).items()})
