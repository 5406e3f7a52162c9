"""Deterministic samplers.

* :func:`masked_ddim` — the original's masked, guided DDIM over seq = range(0, T, T // n), used for
  inversion (x0 -> x_T) and reconstruction / counterfactuals (x_T -> x0). The guidance subtracts
  sqrt(1 − ᾱ_t)·G from ε̂ (not the training c_t; inherited from PDAE and kept on purpose).
* :func:`ddim_sample` — PDAE's plain DDIM for the DDPM alone, on the respaced time-steps
  {int(s) for s in linspace(0, T−1, n + 1)}, ending at ᾱ_0.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import Schedule, at_t
from .masks import TimestepMasks


def _ddim_update(x_t, eps, at, at_next):
    """Clamp x̂0 to [-1, 1], recompute ε from it, step to ᾱ_next (the original's order of ops)."""
    x0 = ((1 / at).sqrt() * x_t - (1 / at - 1).sqrt() * eps).clamp(-1, 1)
    eps = ((1 / at).sqrt() * x_t - x0) / (1 / at - 1).sqrt()
    return at_next.sqrt() * x0 + (1.0 - at_next).sqrt() * eps


@torch.no_grad()
def masked_ddim(decoder, x: torch.Tensor, z: torch.Tensor | None, sched: Schedule,
                masks: TimestepMasks | None, steps: int = 100, inverse: bool = False,
                progress: bool = False) -> torch.Tensor:
    """Masked guided DDIM. ``inverse=True`` maps x0 -> x_T, else x_T -> x0.

    ``z=None`` runs the frozen DDPM alone (no guidance); ``masks=None`` conditions on the whole z.
    """
    T = sched.timesteps
    seq = list(range(0, T, T // steps))
    pairs = list(zip(seq, seq[1:] + [None])) if inverse else list(zip(seq[::-1], ([None] + seq[:-1])[::-1]))
    was_training = decoder.training
    decoder.eval()
    bs, ndim = x.shape[0], x.ndim
    for i, j in tqdm(pairs, desc="ddim inversion" if inverse else "ddim", disable=not progress, leave=False):
        t = torch.full((bs,), i, device=x.device, dtype=torch.long)
        if z is None:
            cond = torch.zeros(bs, decoder.cfg.latent_dim, device=x.device, dtype=x.dtype)
        else:
            cond = z * masks.cumulative(t, z.dtype) if masks is not None else z
        eps, g = decoder(x, t, cond)
        at = at_t(sched.alphas_cumprod, t, ndim)
        if z is not None:
            eps = eps - (1.0 - at).sqrt() * g
        if j is None:  # past the ends: ᾱ = 1 at x0 (reverse), ᾱ = 0 at x_T (inversion)
            at_next = torch.full_like(at, 0.0 if inverse else 1.0)
        else:
            at_next = at_t(sched.alphas_cumprod, torch.full_like(t, j), ndim)
        x = _ddim_update(x, eps, at, at_next)
    decoder.train(was_training)
    return x


def respaced_timesteps(T: int, steps: int) -> list[int]:
    return sorted({int(s) for s in np.linspace(0, T - 1, steps + 1)})


@torch.no_grad()
def ddim_sample(unet, x_T: torch.Tensor, sched: Schedule, steps: int = 100, progress: bool = False) -> torch.Tensor:
    """Plain DDIM sampling of the DDPM from noise x_T (PDAE's discretisation)."""
    ts = respaced_timesteps(sched.timesteps, steps)
    ac = sched.alphas_cumprod.double().cpu()[ts]
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    ac, ac_prev = ac.float().to(x_T.device), ac_prev.float().to(x_T.device)
    was_training = unet.training
    unet.eval()
    x, bs = x_T, x_T.shape[0]
    # Index 0 is only ever used as the last ᾱ_prev: the loop runs over the respaced indices n..1.
    for i in tqdm(range(len(ts) - 1, 0, -1), desc="ddim", disable=not progress, leave=False):
        t = torch.full((bs,), ts[i], device=x.device, dtype=torch.long)
        eps = unet(x, t)
        idx = torch.full((bs,), i, device=x.device, dtype=torch.long)
        x = _ddim_update(x, eps, at_t(ac, idx, x.ndim), at_t(ac_prev, idx, x.ndim))
    unet.train(was_training)
    return x
