"""Phase ``ceilings``: device-to-device copy bandwidth (the roofline of the memory-bound kernels,
``roofline.measure_copy_bandwidth``, as the benchmarks' fixture and kernel_timing.py measure it) and matmul rates."""
from __future__ import annotations

import json
import time
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.settings import TINY


def worker_ceilings(out: Path, tiny: bool = False) -> None:
    """Copy bandwidth (the roofline of memory-bound kernels) and matmul rates (of the engine)."""
    import torch  # lazy: the parent process never imports torch
    from roofline import measure_copy_bandwidth  # imports torch too
    res: dict = {}
    if torch.cuda.is_available():
        res["device"] = torch.cuda.get_device_name()
        res["copy_GBps"] = measure_copy_bandwidth()
        res["copy_method"] = "median of 20 dst.copy_(src), 1 GiB uint8, read+write bytes, CUDA events"
        dev, n, reps = "cuda", 8192, 10
    else:  # --allow-cpu: the same quantities for this CPU, small sizes
        res["device"] = "cpu"
        res["rehearsal"] = True
        nbytes = TINY["ceiling_copy_bytes"] if tiny else 1 << 28
        res["copy_GBps"] = measure_copy_bandwidth(nbytes, iters=5, device="cpu", warmup=1)
        res["copy_method"] = (f"median of 5 dst.copy_(src), {nbytes >> 20} MiB uint8, read+write bytes, "
                              "host clock")
        dev, n, reps = "cpu", TINY["ceiling_matmul_n"] if tiny else 1024, 3
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


def run_phase(ctx) -> None:
    """Parent side: run the worker in a child with the phase's limit."""
    limit = ctx.limit("ceilings")
    res = run_child(ctx.worker_cmd("ceilings", "--worker-out", str(ctx.out / "ceilings.json"),
                                   *(["--tiny"] if ctx.args.tiny else [])),
                    ctx.log("ceilings"), limit, ctx.env())
    ctx.record("ceilings", res, limit)
