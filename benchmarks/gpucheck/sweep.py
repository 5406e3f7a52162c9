"""Phase ``sweep``: the training step at 16 and 128 images per GPU, switch by switch.

Rows (each one ``train()`` run in this phase's single child process, see ``gpucheck/runs.py``):
per-GPU batch 16 and 128 × {channels_last (NHWC), NCHW} × {CUDA graph, eager} × {fused kernels,
unfused}, in the preset's precision (bf16 autocast on CUDA) with sdpa attention and no
torch.compile, plus the original's configuration (fp32, NCHW, math attention, unfused, eager) in
the same harness. The most valuable rows come first (the preset and the original at 16, then the
pair at 128) and the JSON is rewritten after every row, so a phase cut short keeps them. The
model FLOPs per image (forward + backward, torch's FlopCounterMode over one eager step) turn
images/s into an MFU against the measured bf16 matmul rate (phase ceilings).
"""
from __future__ import annotations

import time
from pathlib import Path

from gpucheck.children import ChildResult, run_child
from gpucheck.results import load_json
from gpucheck.settings import (ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG, ORIGINAL_OVERRIDES,
                               SWEEP_BATCHES, SWEEP_ROW_CAP_S, SWEEP_STEPS, TINY, TINY_CONFIG)

_ON_OFF = {True: "true", False: "false"}
# After the preset's configuration (NHWC, graph, fused): one switch off at a time, then two, then all.
_REST = [(True, False, True), (False, True, True), (True, True, False), (False, False, True),
         (True, False, False), (False, True, False), (False, False, False)]


def _grid_row(config: str, batch: int, cl: bool, graph: bool, fused: bool) -> dict:
    name = f"b{batch}-{'nhwc' if cl else 'nchw'}-{'graph' if graph else 'eager'}-{'fused' if fused else 'unfused'}"
    return {"name": name, "config": config, "batch": batch, "channels_last": cl, "cuda_graph": graph,
            "fused": fused, "original": False, "precision": "preset (bf16 autocast on CUDA)",
            "overrides": [f"fast.channels_last={_ON_OFF[cl]}", f"fast.cuda_graph={_ON_OFF[graph]}",
                          f"fast.fused_norm={_ON_OFF[fused]}", f"fast.fused_loss={_ON_OFF[fused]}",
                          "fast.attention=sdpa", "fast.compile=false"]}


def _original_row(config: str, batch: int) -> dict:
    return {"name": f"b{batch}-original", "config": config, "batch": batch, "channels_last": False,
            "cuda_graph": False, "fused": False, "original": True, "precision": "fp32, math attention",
            "overrides": list(ORIGINAL_OVERRIDES)}


def sweep_plan(fast_config: str = ENGINE_FAST_CONFIG, original_config: str = ENGINE_ORIGINAL_CONFIG,
               batches: tuple[int, ...] = SWEEP_BATCHES, tiny: bool = False) -> list[dict]:
    """The rows in the order they run."""
    if tiny:
        # The rehearsal's rows run on a CPU, where the fused kernels are interpreted and
        # channels_last convolutions are slow: the graph-safe step (uncaptured there) and the
        # original's configuration.
        b = TINY["sweep_batch"]
        return [_grid_row(fast_config, b, False, True, False), _original_row(original_config, b)]
    rows = []
    for b in batches:        # the preset and the original first, at every batch
        rows += [_grid_row(fast_config, b, True, True, True), _original_row(original_config, b)]
    for b in batches:
        rows += [_grid_row(fast_config, b, *sw) for sw in _REST]
    return rows


def _flops_per_image(tmp: Path, config: str, ddpm: Path, batch: int) -> float:
    """Model FLOPs of one eager training step (forward + backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode
    from gpucheck.runs import train_run
    with FlopCounterMode(display=False) as fc:
        row = train_run(tmp, "flops", config, ["fast.cuda_graph=false", "fast.compile=false"], batch, 1, 1, 600, ddpm)
    if row["status"] != "ok":
        raise RuntimeError(row.get("error") or row["status"])
    return fc.get_total_flops() / batch


def worker_sweep(out: Path, tmp: Path, deadline: float, fast_config: str, original_config: str, tiny: bool) -> None:
    import torch
    from gpucheck.runs import Incremental, device_name, ensure_ddpm, timed_interval, train_run
    cuda = torch.cuda.is_available()
    if tiny:
        fast_config = original_config = TINY_CONFIG
    plan = sweep_plan(fast_config, original_config, tiny=tiny)
    res = Incremental(out, {
        "device": device_name(), "rehearsal": not cuda, "tiny": tiny, "config": fast_config,
        "original_config": original_config,
        "what": "train() per row: data.source=fixed (one uint8 batch on the device), warm-up interval then timed "
                "interval (device synced at both ends only), DeepSpeed timers off, no torch.compile",
        "planned": [r["name"] for r in plan], "runs": []})
    ddpm = ensure_ddpm(tmp, fast_config)
    if original_config != fast_config:
        ensure_ddpm(tmp, original_config)  # the same network: the original reads the same file
    for i, spec in enumerate(plan):
        b = spec["batch"]
        n = TINY["sweep_steps"] if tiny else SWEEP_STEPS[b]
        cap = 600.0 if tiny else SWEEP_ROW_CAP_S[b]
        if time.time() + 5 > deadline:
            res.data["stopped"] = f"phase time spent before row {spec['name']}"
            res.save()
            break
        row = train_run(tmp, spec["name"], spec["config"], spec["overrides"], b, 2 * n, n, cap, ddpm)
        row.update({k: spec[k] for k in ("channels_last", "cuda_graph", "fused", "original", "precision")})
        row["warmup_steps"] = n
        row.update(timed_interval(row, n))
        row.pop("records", None)
        res.data["runs"].append(row)
        res.save()
        print(f"[sweep] {row['name']}: {row['status']}"
              + (f", {row['images_per_s']:.1f} img/s" if row.get("images_per_s") else "")
              + (f" ({row['error']})" if row.get("error") else ""), flush=True)
        if i == (1 if tiny else 3) and "flops_per_image" not in res.data:
            try:
                res.data["flops_per_image"] = _flops_per_image(tmp, fast_config, ddpm, 2)
            except Exception as e:  # noqa: BLE001
                res.data["flops_error"] = f"{type(e).__name__}: {e}"[:300]
            res.save()


def run_phase(ctx) -> None:
    """Parent side: the sweep worker in one child with the phase's limit."""
    limit = ctx.limit("sweep")
    cmd = ctx.worker_cmd("sweep", "--worker-out", str(ctx.out / "sweep.json"), "--tmp", str(ctx.tmp / "work"),
                         "--deadline", str(time.time() + limit),
                         "--engine-fast-config", ctx.args.engine_fast_config,
                         "--engine-original-config", ctx.args.engine_original_config,
                         *(["--tiny"] if ctx.args.tiny else []))
    res = run_child(cmd, ctx.log("sweep"), limit, ctx.env())
    sw = load_json(ctx.out / "sweep.json") or {}
    runs = sw.get("runs") or []
    extra = {}
    if res.status == "ok" and sw.get("stopped"):   # the worker stopped itself at the phase's limit
        res = ChildResult("timeout", res.returncode, res.wall_s)
        extra["reason"] = f"stopped by its time limit: {sw['stopped']}"
    ctx.record("sweep", res, limit, **extra, rows=f"{sum(bool(r.get('images_per_s')) for r in runs)} timed of "
               f"{len(sw.get('planned') or [])} planned")
