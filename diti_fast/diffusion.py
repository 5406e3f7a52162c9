"""The DDPM noise schedule, DiTi's per-time-step loss coefficients, and q_sample.

Everything is computed exactly as the original: float32 torch arithmetic (not float64 numpy), so
the golden tables match to the last bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DiffusionConfig


@dataclass
class Schedule:
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    shift_coef: torch.Tensor  # c_t = -sqrt(a_t)(1 - abar_{t-1}) / sqrt(1 - abar_t); c_0 == 0
    weight: torch.Tensor      # w_t = snr^0.1 / (1 + snr)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device) -> "Schedule":
        return Schedule(**{k: v.to(device) for k, v in self.__dict__.items()})


def make_schedule(cfg: DiffusionConfig, device="cpu") -> Schedule:
    f32 = dict(dtype=torch.float32, device=device)
    betas = torch.linspace(cfg.linear_beta_start, cfg.linear_beta_end, cfg.timesteps, **f32)
    alphas = 1 - betas
    ac = alphas.cumprod(dim=0)
    ac_prev = torch.cat([torch.ones(1, **f32), ac[:-1]])
    shift_coef = -alphas.sqrt() * (1 - ac_prev) / (1 - ac).sqrt()
    snr = ac / (1 - ac)
    weight = snr ** 0.1 / (1 + snr)
    return Schedule(betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
                    sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(),
                    shift_coef=shift_coef, weight=weight)


def at_t(table: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """Gather per-sample coefficients and shape them to broadcast over an ndim tensor."""
    return table[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (at_t(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + at_t(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)
