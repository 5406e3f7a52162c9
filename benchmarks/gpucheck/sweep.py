"""Phase ``sweep``: where the step stops being launch-bound, per-GPU batch by batch.

The users' launch (8 GPUs, global batch 128) gives 16 images per GPU. This phase times the
engine's own step (``Objective`` + ``engine/graph_step.GraphStep``: the celeba64 preset's DiTi
model, bf16 autocast, fused kernels, sdpa; not torch.compile, whose minute of compilation per
configuration the budget cannot pay) at per-GPU batches 16, 32, 64 and 128, with and without the
CUDA graph and with and without channels_last, in one child process. The model FLOPs per image
(forward + backward, counted once with torch's FlopCounterMode) turn images/s into TFLOP/s; the
results analysis divides by the measured bf16 matmul rate (phase ceilings) for the MFU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.results import load_json
from gpucheck.settings import ENGINE_FAST_CONFIG, KILL_GRACE_S, SWEEP_BATCHES, SWEEP_STEPS


class _Batches:
    def __init__(self, batch):
        self.batch = batch

    def next(self, micro_step):
        return self.batch


def _runner(cfg_path: str, batch: int, channels_last: bool, graph: bool, dev):
    import torch
    from diti_fast.engine.ema import EMA
    from diti_fast.engine.graph_step import GraphStep, StepPlan
    from diti_fast.engine.metrics import Meter
    from diti_fast.engine.objective import Objective
    from diti_fast.engine.config_files import load_config
    cfg = load_config(cfg_path, ["data.source=fixed", f"data.batch_size={batch}", "fast.compile=false",
                                 f"fast.channels_last={str(channels_last).lower()}", "deepspeed.grad_accum=1"])
    torch.manual_seed(0)
    obj = Objective(cfg, dev, autocast=dev.type == "cuda").to(dev).train()
    obj.channels_last_weights()
    trainable = obj.trainable()
    opt = torch.optim.Adam([p for _, p in trainable], lr=1e-4, fused=True, capturable=graph)
    ema, meter = EMA(trainable, cfg.ema.decay), Meter(cfg.log.t_buckets, cfg.model.diffusion.timesteps, dev)
    size = cfg.image_size()
    data = _Batches(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev))
    return GraphStep(StepPlan(True, graph, None), cfg, obj, opt, ema, meter, data, 0, 1, batch, dev, 0), obj


def _flops_per_image(cfg_path: str, dev, batch: int = 16) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    runner, obj = _runner(cfg_path, batch, False, False, dev)
    runner.step(0)
    x = torch.rand(batch, 3, runner.raw[0].shape[-1], runner.raw[0].shape[-1], device=dev) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        out, _ = obj(x, torch.arange(batch, device=dev))
        out.loss.backward()
    return fc.get_total_flops() / batch


def worker_sweep(out: Path, deadline: float, cfg_path: str = ENGINE_FAST_CONFIG,
                 batches: tuple[int, ...] = SWEEP_BATCHES) -> None:
    """On a CPU (``--allow-cpu``, to test this script) only the uncaptured step runs."""
    import torch
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "config": cfg_path, "steps": SWEEP_STEPS,
                    "what": "Objective + GraphStep (bf16 autocast, fused kernels, sdpa), no torch.compile",
                    "runs": []}

    def save():
        out.write_text(json.dumps(result, indent=1))
    result["flops_per_image"] = _flops_per_image(cfg_path, dev, min(16, batches[0]))
    save()
    for batch in batches:
        for channels_last in (False, True):
            for graph in ((False, True) if cuda else (False,)):
                if time.time() > deadline - 15:
                    result["stopped"] = f"phase limit reached before batch {batch}"
                    save()
                    return
                row = {"batch": batch, "channels_last": channels_last, "cuda_graph": graph}
                runner = None
                try:
                    runner, _ = _runner(cfg_path, batch, channels_last, graph, dev)
                    for i in range(5):  # warm-up (3 eager), capture, first replay
                        runner.step(i)
                    sync()
                    t0 = time.perf_counter()
                    for i in range(SWEEP_STEPS):
                        runner.step(5 + i)
                    sync()
                    dt = (time.perf_counter() - t0) / SWEEP_STEPS
                    row.update(step_s=dt, images_per_s=batch / dt,
                               peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None)
                except Exception as e:  # noqa: BLE001 - one configuration's failure is a row, not the end
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"[sweep] {row}", flush=True)
                result["runs"].append(row)
                save()
                del runner
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()


def run_phase(ctx) -> None:
    """Parent side: the sweep worker in one child with the phase's limit."""
    limit = ctx.limit("sweep")
    cmd = ctx.worker_cmd("sweep", "--worker-out", str(ctx.out / "sweep.json"),
                         "--deadline", str(time.time() + limit - KILL_GRACE_S - 2),
                         "--engine-fast-config", ctx.args.engine_fast_config)
    res = run_child(cmd, ctx.log("sweep"), limit, ctx.env())
    sw = load_json(ctx.out / "sweep.json") or {}
    ctx.record("sweep", res, limit, configurations=len(sw.get("runs") or []))
