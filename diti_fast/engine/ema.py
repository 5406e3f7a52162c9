"""Exponential moving average of the trainable parameters, one fused foreach op per update.

The update is fused over the whole parameter list (not two kernel launches per tensor): ema ← ema + w·(θ − ema) with w = 1 − decay, the same
arithmetic as ``ema.mul_(decay).add_(θ, alpha=1 − decay)`` up to rounding.

``w`` may be a 0-dim device tensor: the engine multiplies it by the step's "loss was finite" flag,
so a skipped step leaves the EMA untouched without a host synchronisation. ``_foreach_lerp_`` only
takes a Python scalar weight (a tensor would be read back to the host), so that case runs
sub / mul-by-tensor / add: three fused foreach kernels and one temporary of the trainable size.

:func:`step_weight` is the engine's rule for ``w`` (``ema.every``, the decay warm-up, the skip of
a non-finite step), computed on the device from the step counter so that the same arithmetic runs
eagerly and inside a CUDA graph.

The shadow copies are float32 whatever the parameters' dtype: at decay 0.9999 an increment is 1e-4
of the difference, below bf16's resolution.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def warmup_decay(decay, n):
    """The decay of an EMA update after ``n`` earlier updates: min(decay, (1 + n) / (10 + n)), so
    that early averages are not dominated by the initial weights. ``decay`` and ``n`` are both
    Python numbers or both tensors."""
    ramp = (1 + n) / (10 + n)
    return torch.minimum(decay, ramp) if isinstance(ramp, torch.Tensor) else min(decay, ramp)


def step_weight(steps_done: torch.Tensor, finite: torch.Tensor, decay: float, every: int, warmup: bool
                ) -> torch.Tensor:
    """The EMA weight 1 − decay of the step being taken (float32, 0-dim, on ``steps_done``'s device).

    ``steps_done``: int64 count of optimiser steps before this one. The update happens on every
    ``every``-th step; with ``warmup`` the decay is ``warmup_decay(decay, n)``, n the updates done
    before this one. ``finite`` False (a skipped step) or a step between updates gives 0. The
    arithmetic is float64, as Python floats are, rounded once to float32 at the end: the same
    bits as ``finite * (1.0 - decay)`` with ``decay`` a Python float."""
    s = steps_done + 1                                   # the step being taken, 1-based
    due = (s % every) == 0
    d = torch.full((), decay, dtype=torch.float64, device=steps_done.device)
    if warmup:
        n = (s // every - 1).to(torch.float64)
        d = warmup_decay(d, n)
    return ((finite & due).to(torch.float64) * (1.0 - d)).to(torch.float32)


class EMA:
    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        named = list(named_params)
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self._same_dtype = all(p.dtype == torch.float32 for p in self.params)

    @torch.no_grad()
    def update(self, weight: float | torch.Tensor | None = None) -> None:
        """One EMA step; ``weight`` overrides 1 − decay (a tensor: masked on the device)."""
        src = [p.detach() for p in self.params]
        if not self._same_dtype:
            src = [p.float() for p in src]
        if not isinstance(weight, torch.Tensor):
            torch._foreach_lerp_(self.shadow, src, (1.0 - self.decay) if weight is None else float(weight))
            return
        diff = torch._foreach_sub(src, self.shadow)
        torch._foreach_mul_(diff, weight.to(torch.float32))
        torch._foreach_add_(self.shadow, diff)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], what: str = "EMA state") -> None:
        missing = [n for n in self.names if n not in state]
        unexpected = [n for n in state if n not in set(self.names)]
        if missing or unexpected:
            raise ValueError(f"{what} does not match the trainable parameters: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                if state[n].shape != s.shape:
                    raise ValueError(f"{what}: {n} has shape {tuple(state[n].shape)}, expected {tuple(s.shape)}")
                s.copy_(state[n])

    def full_state_dict(self, module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        """``module``'s state dict with the trainable entries replaced by their EMA (for export).

        ``prefix`` is stripped from the EMA names (e.g. "decoder.") to match ``module``'s keys.
        """
        sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for n, s in zip(self.names, self.shadow):
            if n.startswith(prefix):
                key = n[len(prefix):]
                if key in sd:
                    sd[key] = s.to(sd[key].dtype).clone()
        return sd
