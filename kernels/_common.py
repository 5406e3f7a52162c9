"""Small helpers shared by the Triton kernels in ``diti_fast.kernels``.

Kept deliberately small and stable: other kernels import from here.
"""
from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; everything here must still import without it
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

# Read once at import, not per call: triton itself decides interpreted-vs-compiled when a
# ``@triton.jit`` decorator runs (at import of the kernel module), so the variable has to be set
# before import anyway, and a module constant is something torch.compile can trace without
# guarding on os.environ.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``: a CUDA tensor, or any tensor under the interpreter."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
