"""Phase ``ceilings``: device-to-device copy bandwidth (the roofline of the memory-bound kernels,
measured by the same function as the benchmarks' ``copy_bandwidth`` fixture) and matmul rates."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.settings import REPO, TINY

def worker_ceilings(out: Path, tiny: bool = False) -> None:
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
        res["rehearsal"] = True
        src = torch.empty(TINY["ceiling_copy_bytes"] if tiny else 1 << 28, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        res["copy_GBps"] = 2 * src.numel() / sorted(times)[2] / 1e9
        res["copy_method"] = (f"median of 5 dst.copy_(src), {src.numel() >> 20} MiB uint8, read+write bytes, "
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
