"""The copy-bandwidth ceiling: what a plain ``dst.copy_(src)`` achieves on a device, the roofline the
memory-bound kernels report against (achieved GB/s / copy GB/s). One definition for the benchmarks'
``copy_bandwidth`` fixture, gpu_check's ceilings phase and ``kernel_timing.py``."""
from __future__ import annotations

import statistics
import time

import torch


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20, device: str | torch.device = "cuda",
                           warmup: int = 3) -> float:
    """Median GB/s (1e9 bytes/s, read + write counted) of ``dst.copy_(src)`` over ``iters`` copies.

    On CUDA each copy is timed with events; 1 GiB is far beyond any L2, so this is HBM bandwidth as
    a plain copy achieves it. On a CPU (the rehearsals) the host clock times host-memory copies."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(warmup):  # allocator, clocks
        dst.copy_(src)
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9
