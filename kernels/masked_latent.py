"""DiTi's masked latent conditioning z ⊙ m_t, with m_t built from per-sample prefix lengths.

m_t[b, :] is 1 on [0, end_dims[b]) and 0 after. The original gathers rows of a [k, D] mask table;
here the mask is ``arange(D) < end_dims[:, None]``: no table, no gather, one fused compare+multiply
that torch.compile folds into whatever consumes it.

Why there is no fused (masked-GEMV) kernel: the latent projection ``Linear(512, 4C)`` applied to
z ⊙ m_t is a [B, 512] × [512, 4C] product run once per step (~17 MFLOP and ~1 MB of weights at
B = 64, C = 128), while a single GroupNorm of one ResBlock at 64² moves ~67–134 MB. Skipping the
masked columns or the [B, 512] mask multiply cannot save a measurable fraction of a step;
``benchmarks/bench_masked_latent.py`` measures it (numbers in its docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["latent_prefix_mask", "masked_latent", "masked_latent_projection"]


def _check(z: torch.Tensor, end_dims: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        raise ValueError(f"masked_latent: z must be a [B, D] tensor, got shape "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if not z.is_floating_point():
        raise ValueError(f"masked_latent: z has dtype {z.dtype}; expected a floating dtype")
    if not isinstance(end_dims, torch.Tensor) or end_dims.shape != (z.shape[0],):
        raise ValueError(f"masked_latent: end_dims must be a [B] = [{z.shape[0]}] tensor of prefix lengths, "
                         f"got {tuple(end_dims.shape) if isinstance(end_dims, torch.Tensor) else end_dims!r}")
    if end_dims.dtype.is_floating_point or end_dims.dtype == torch.bool or end_dims.is_complex():
        raise ValueError(f"masked_latent: end_dims must be an integer tensor, got {end_dims.dtype}")
    if end_dims.device != z.device:
        raise ValueError(f"masked_latent: end_dims is on {end_dims.device} but z is on {z.device}")


def latent_prefix_mask(end_dims: torch.Tensor, latent_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B] prefix lengths -> [B, latent_dim] mask, ones on [0, end_dims[b])."""
    ar = torch.arange(latent_dim, device=end_dims.device)
    return (ar[None, :] < end_dims[:, None]).to(dtype)


def masked_latent(z: torch.Tensor, end_dims: torch.Tensor) -> torch.Tensor:
    """z ⊙ m_t for per-sample prefix lengths ``end_dims`` [B] (integers in [0, D]).

    A multiply (not ``torch.where``) so the result is bit-identical to the original's
    ``z * masks[idx]``, non-finite z included.
    """
    _check(z, end_dims)
    return z * latent_prefix_mask(end_dims, z.shape[1], z.dtype)


def masked_latent_projection(z: torch.Tensor, end_dims: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Linear(D, out)(z ⊙ m_t)``, the latent projection that feeds the z-modulations."""
    return F.linear(masked_latent(z, end_dims), weight, bias)
