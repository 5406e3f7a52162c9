"""Test-wide setup.

Triton decides between compiled and interpreted kernels when a kernel module is imported, so the
interpreter switch must be in the environment before any test imports diti_fast.kernels. On a GPU
machine nothing is set and the same tests run compiled.

DeepSpeed picks one accelerator per process when it is imported. On a machine with CUDA that is
CUDA, and the engine tests written for the CPU (train() with run.device=cpu through DeepSpeed's
CPU accelerator) would mix devices: there they are skipped, with the reason, except the tests in
those modules that need CUDA themselves (a skipif whose reason names CUDA).
"""
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_NAME = "diti_reference_tiny.pt"
# The golden tensors recorded from the original code ship with the repository (a clone needs
# nothing beside it); a copy at ../shared/reference/ beside the checkout, when present, wins,
# so a newer recording placed there is what the tests check.
SHARED_FIXTURE = REPO.parent / "shared" / "reference" / FIXTURE_NAME
SHIPPED_FIXTURE = REPO / "tests" / "fixtures" / "golden" / FIXTURE_NAME


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks are off in a plain run: --benchmark-disable is set here when pytest-benchmark is
    installed, not in pyproject's addopts, so that pytest also runs without the dev extra (an
    unknown addopt stops it before collecting anything). --benchmark-enable turns them on."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


# A test module that drives the engine: train(), train.py, the claim or demo pipelines, DeepSpeed.
_CPU_ENGINE_SOURCE = re.compile(r"diti_fast\.engine\.loop|diti_fast\.engine import loop|diti_fast/train\.py|"
                                r"diti_fast\.train\b|import deepspeed|diti_fast\.claim|diti_fast\.demo")
_module_drives_engine: dict[Path, bool] = {}


def drives_cpu_engine(path: Path) -> bool:
    if path not in _module_drives_engine:
        try:
            _module_drives_engine[path] = bool(_CPU_ENGINE_SOURCE.search(Path(path).read_text(errors="replace")))
        except OSError:
            _module_drives_engine[path] = False
    return _module_drives_engine[path]


def needs_cuda(item) -> bool:
    """A test marked to run only with CUDA (skipif(not cuda, reason="... CUDA ..."))."""
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CPU engine test (DeepSpeed's CPU accelerator): CUDA is present, so DeepSpeed "
                                   "runs on CUDA in this process; CI runs it on a CPU")
    for item in items:
        if drives_cpu_engine(Path(str(item.path))) and not needs_cuda(item):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    bit-equal reductions across runs, and no thread overhead on tiny tensors. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def golden_fixture() -> Path:
    return SHARED_FIXTURE if SHARED_FIXTURE.is_file() else SHIPPED_FIXTURE


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    path = golden_fixture()
    if not path.is_file():
        pytest.fail(f"golden fixture not found: neither {SHARED_FIXTURE} nor {SHIPPED_FIXTURE}")
    return path
