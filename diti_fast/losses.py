"""Training objectives: the DDPM ε-loss (:func:`ddpm_objective`) and DiTi's masked shift loss
(:func:`diti_objective`: base / stop_grad / dual / pdae). Each takes the models and returns a
:class:`LossOut`; the element-wise tensor ops they reduce are :func:`weighted_shift_loss_ref` and,
fused, ``diti_fast.kernels.diti_loss`` / ``ddpm_loss``.

The caller draws t and ε (the engine keys them by global sample index so results do not depend on
the number of ranks); these functions are pure given (x0, t, ε).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .diffusion import Schedule, at_t, q_sample
from .masks import TimestepMasks

MODES = ("base", "stop_grad", "dual", "pdae")


@dataclass
class LossOut:
    loss: torch.Tensor          # scalar, what backward() is called on
    per_sample: torch.Tensor    # [B] mean over C·H·W, detached (for per-t-bucket monitoring)
    # The fused kernel's per-t-bucket (sums of per_sample, counts), computed in the same pass; the
    # engine's meter takes them instead of recomputing. None on the unfused path.
    buckets: tuple[torch.Tensor, torch.Tensor] | None = None

    def __add__(self, other: "LossOut") -> "LossOut":
        buckets = None
        if self.buckets is not None and other.buckets is not None:
            buckets = (self.buckets[0] + other.buckets[0], self.buckets[1] + other.buckets[1])
        return LossOut(self.loss + other.loss, self.per_sample + other.per_sample, buckets)


def _per_sample(elem: torch.Tensor) -> torch.Tensor:
    """[B] mean over everything but the batch dim; a reduction over dims, so a channels_last
    tensor is read in place (``flatten(1)`` would copy it to NCHW first)."""
    return elem.detach().mean(dim=tuple(range(1, elem.ndim)))


def weighted_shift_loss_ref(eps: torch.Tensor, eps_hat: torch.Tensor, g: torch.Tensor, t: torch.Tensor,
                            sched: Schedule) -> torch.Tensor:
    """Element-wise w_t·(ε − (ε̂ + c_t·G))², op for op the original's p_loss."""
    c = at_t(sched.shift_coef, t, eps.ndim)
    w = at_t(sched.weight, t, eps.ndim)
    return w * (eps - (eps_hat + c * g)) ** 2


def shift_loss(eps, eps_hat, g, t, sched: Schedule, fused: bool = False, num_buckets: int = 10) -> LossOut:
    if fused:
        # t comes from randint(0, T): skip the range check, which would read t back to the host.
        loss, per_sample, bsum, bcount = kernels.diti_loss(eps, eps_hat, g, t, sched.shift_coef, sched.weight,
                                                           num_buckets=num_buckets, check_t=False)
        return LossOut(loss, per_sample.detach(), (bsum, bcount))
    elem = weighted_shift_loss_ref(eps, eps_hat.to(g.dtype), g, t, sched).float()
    return LossOut(elem.mean(), _per_sample(elem))


def ddpm_objective(unet, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sched: Schedule,
                   fused: bool = False, num_buckets: int = 10) -> LossOut:
    """Plain ε-prediction loss used to pre-train the DDPM: mean((ε − ε_θ(x_t, t))²)."""
    pred = unet(q_sample(sched, x0, t, noise), t)
    if fused:
        loss, per_sample, bsum, bcount = kernels.ddpm_loss(noise, pred, t, timesteps=sched.timesteps,
                                                           num_buckets=num_buckets, check_t=False)
        return LossOut(loss, per_sample.detach(), (bsum, bcount))
    elem = ((noise - pred.to(noise.dtype)) ** 2).float()
    return LossOut(elem.mean(), _per_sample(elem))


def conditioning(z: torch.Tensor, t: torch.Tensor, masks: TimestepMasks, mode: str) -> torch.Tensor:
    """The latent handed to the decoder for one branch of the loss.

    base: z ⊙ m_t. stop_grad: same value, but only the current chunk's dims carry encoder gradient.
    pdae: the PDAE baseline, unmasked z.
    """
    if mode == "pdae":
        return z
    if mode == "base":
        return z * masks.cumulative(t, z.dtype)
    if mode == "stop_grad":
        return z.detach() * masks.receding(t, z.dtype) + z * masks.chunk(t, z.dtype)
    raise ValueError(f"unknown conditioning mode {mode!r}")


def diti_objective(encoder, decoder, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sched: Schedule,
                   masks: TimestepMasks, mode: str = "base", fused: bool = False, z: torch.Tensor | None = None,
                   num_buckets: int = 10) -> LossOut:
    """DiTi's objective. ``dual`` sums the base and stop_grad losses, as the original."""
    if mode not in MODES:
        raise ValueError(f"unknown DiTi mode {mode!r}; choose one of {MODES}")
    if z is None:
        z = encoder(x0)
    x_t = q_sample(sched, x0, t, noise)
    branches = ["base", "stop_grad"] if mode == "dual" else [mode]
    total = None
    for branch in branches:
        eps_hat, g = decoder(x_t, t, conditioning(z, t, masks, branch))
        out = shift_loss(noise, eps_hat, g, t, sched, fused, num_buckets)
        total = out if total is None else total + out
    return total
