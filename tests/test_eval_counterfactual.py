"""Counterfactual algebra (docs/method.md §7): chunk ranges, the z mix and slerp, checked against closed forms
and against the k_masks table built independently by TimestepMasks."""
import math

import pytest
import torch

from diti_fast.config import MaskConfig
from diti_fast.eval.counterfactual import chunk_dims, slerp, swap_chunks
from diti_fast.eval.features import EvalError
from diti_fast.masks import TimestepMasks

UNEQUAL = MaskConfig(k=64, stages=(50, 100, 300, 500, 1000), dims_per_stage=(10, 25, 327, 100, 50))


@pytest.fixture(scope="module")
def masks():
    return TimestepMasks.build(UNEQUAL, 512, 1000)


def test_chunk_dims_against_the_documented_end_dims(masks):
    # docs/method.md §3: E = [2, 4, 6, 10, 18, 26, 35, 60, ...]; chunks [2, 6) are dims [E_1, E_5) = [4, 26).
    assert chunk_dims(masks.end_dims, 2, 6) == (4, 26)
    assert chunk_dims(masks.end_dims, 0, 4) == (0, 10)
    assert chunk_dims(masks.end_dims, 32, 64) == (462, 512)
    assert chunk_dims(masks.end_dims, 32, 80) == (462, 512)  # clipped to k like the original
    with pytest.raises(EvalError):
        chunk_dims(masks.end_dims, 70, 80)


@pytest.mark.parametrize("lo,w", [(2, 4), (16, 8), (24, 8), (32, 32), (0, 1)])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_swap_chunks_matches_k_mask_sum(masks, lo, w, alpha):
    g = torch.Generator().manual_seed(lo * 100 + w)
    z1, z2 = torch.randn(3, 512, generator=g), torch.randn(3, 512, generator=g)
    K = masks.tables()["k_masks"][lo:lo + w].sum(0)  # Σ k_masks over the chunk range, as in the original
    expect = z1 - z1 * K + ((1 - alpha) * (z1 * K) + alpha * (z2 * K))
    got = swap_chunks(z1, z2, *chunk_dims(masks.end_dims, lo, lo + w), alpha)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_swap_chunks_endpoints(masks):
    z1, z2 = torch.randn(2, 512), torch.randn(2, 512)
    lo, hi = chunk_dims(masks.end_dims, 16, 24)
    assert torch.equal(swap_chunks(z1, z2, lo, hi, 0.0), z1)
    z = swap_chunks(z1, z2, lo, hi, 1.0)
    assert torch.equal(z[:, lo:hi], z2[:, lo:hi])
    assert torch.equal(z[:, :lo], z1[:, :lo]) and torch.equal(z[:, hi:], z1[:, hi:])


def test_slerp_closed_forms():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a.view(-1)[0], b.view(-1)[1] = 3.0, 3.0  # orthogonal, equal norm: θ = π/2
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # At α = 1/2 the point on the great circle is (a + b) / (2 cos(θ/2)) = (a + b)/√2: norm stays 3.
    torch.testing.assert_close(slerp(a, b, 0.5), (a + b) / math.sqrt(2))
    # α = 1/3: weights sin(2θ/3)/sin θ and sin(θ/3)/sin θ with θ = π/2.
    torch.testing.assert_close(slerp(a, b, 1 / 3), a * math.sin(math.pi / 3) + b * math.sin(math.pi / 6))


def test_slerp_is_per_sample_and_falls_back_to_lerp_for_parallel_inputs():
    a = torch.randn(4, 3, 8, 8)
    b = torch.randn(4, 3, 8, 8)
    b[1] = 2 * a[1]  # parallel pair: slerp is undefined (sin θ = 0), lerp is the limit
    out = slerp(a, b, 0.3)
    torch.testing.assert_close(out[1], 0.7 * a[1] + 0.3 * b[1])
    torch.testing.assert_close(out[2:3], slerp(a[2:3], b[2:3], 0.3))
    assert torch.isfinite(out).all()
