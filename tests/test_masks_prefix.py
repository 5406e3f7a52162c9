"""The hot path's prefix mask (an arange compare on per-sample end dims) against the original's
[k, D] mask table gathered by chunk index, written out element by element."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from diti_fast.masks import prefix_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def table(ends: list[int], D: int) -> torch.Tensor:
    """The original's mask table, written element by element: row i has ones on [0, ends[i])."""
    t = torch.zeros(len(ends), D)
    for i, e in enumerate(ends):
        for d in range(e):
            t[i, d] = 1.0
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_table_gather(dtype):
    g = torch.Generator().manual_seed(0)
    D, k, B = 40, 8, 13
    ends = [0, 3, 5, 10, 17, 29, 39, 40]                     # includes the empty and the full prefix
    masks = table(ends, D)
    idx = torch.randint(0, k, (B,), generator=g)
    z = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    end_dims = torch.tensor(ends)[idx].to(DEVICE)
    expected = z * masks[idx].to(DEVICE, dtype)
    got = z * prefix_mask(end_dims, D, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_nonfinite_values_are_masked_like_the_original():
    z = torch.tensor([[1.0, float("inf"), float("nan")]], device=DEVICE)
    got = z * prefix_mask(torch.tensor([1], device=DEVICE), 3)
    torch.testing.assert_close(got, z * torch.tensor([[1.0, 0.0, 0.0]], device=DEVICE), equal_nan=True)


def test_projection_and_gradient():
    g = torch.Generator().manual_seed(1)
    B, D, out = 6, 16, 12
    z = torch.randn(B, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(out, D, generator=g, dtype=torch.float64).to(DEVICE)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(DEVICE)
    end_dims = torch.tensor([0, 1, 5, 9, 15, 16], device=DEVICE)
    mask = table(end_dims.tolist(), D).to(DEVICE, torch.float64)
    y = F.linear(z * prefix_mask(end_dims, D, z.dtype), w, b)
    torch.testing.assert_close(y, (z * mask) @ w.T + b)
    (dz,) = torch.autograd.grad(y.sum(), [z])
    torch.testing.assert_close(dz, mask * w.sum(0))


def test_mask_helper():
    m = prefix_mask(torch.tensor([0, 2, 4]), 4, torch.float32)
    assert torch.equal(m, table([0, 2, 4], 4))
