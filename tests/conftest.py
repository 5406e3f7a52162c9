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
FIXTURE = REPO.parent / "shared" / "reference" / "diti_reference_tiny.pt"


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    if not FIXTURE.is_file():
        pytest.fail(f"golden fixture not found at {FIXTURE} (expected ../shared/reference beside the repo)")
    return FIXTURE
