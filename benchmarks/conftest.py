"""Shared benchmark fixtures.

``copy_bandwidth``: the device's measured device-to-device copy bandwidth, the roofline that
memory-bound kernels report against (``achieved GB/s / copy_bandwidth``).
"""
from __future__ import annotations

import pytest
import torch
from roofline import measure_copy_bandwidth  # benchmarks/ is on sys.path beside this conftest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks are off in a plain run: --benchmark-disable is set here when pytest-benchmark is
    installed, not in pyproject's addopts, so that pytest also runs without the dev extra (an
    unknown addopt stops it before collecting anything). --benchmark-enable turns them on."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth of the current CUDA device, GB/s (read + write)."""
    if not torch.cuda.is_available():
        pytest.skip("copy_bandwidth needs a CUDA device")
    return measure_copy_bandwidth()
