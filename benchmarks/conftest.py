"""Shared benchmark fixtures.

``copy_bandwidth``: the device's measured device-to-device copy bandwidth, the roofline that
memory-bound kernels report against (``achieved GB/s / copy_bandwidth``).
"""
from __future__ import annotations

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks are off in a plain run: --benchmark-disable is set here when pytest-benchmark is
    installed, not in pyproject's addopts, so that pytest also runs without the dev extra (an
    unknown addopt stops it before collecting anything). --benchmark-enable turns them on."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20, device: str | torch.device = "cuda") -> float:
    """Median GB/s (1e9 bytes/s, read + write counted) of ``dst.copy_(src)`` on one CUDA device.

    1 GiB buffers are far beyond any L2, so this is HBM bandwidth as a plain copy achieves it.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: allocator, clocks
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / times[len(times) // 2] / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth of the current CUDA device, GB/s (read + write)."""
    if not torch.cuda.is_available():
        pytest.skip("copy_bandwidth needs a CUDA device")
    return measure_copy_bandwidth()
