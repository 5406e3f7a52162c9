"""Test-wide setup.

Triton decides between compiled and interpreted kernels when a kernel module is imported, so the
interpreter switch must be in the environment before any test imports diti_fast.kernels. On a GPU
machine nothing is set and the same tests run compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_NAME = "diti_reference_tiny.pt"
# The golden tensors recorded from the original code ship with the repository (a clone needs
# nothing beside it); the steering repo's shared copy, when present beside the checkout, wins,
# so a newer recording there is what the tests check.
SHARED_FIXTURE = REPO.parent / "shared" / "reference" / FIXTURE_NAME
SHIPPED_FIXTURE = REPO / "tests" / "fixtures" / "golden" / FIXTURE_NAME


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks are off in a plain run: --benchmark-disable is set here when pytest-benchmark is
    installed, not in pyproject's addopts, so that pytest also runs without the dev extra (an
    unknown addopt stops it before collecting anything). --benchmark-enable turns them on."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


def golden_fixture() -> Path:
    return SHARED_FIXTURE if SHARED_FIXTURE.is_file() else SHIPPED_FIXTURE


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    path = golden_fixture()
    if not path.is_file():
        pytest.fail(f"golden fixture not found: neither {SHARED_FIXTURE} nor {SHIPPED_FIXTURE}")
    return path
