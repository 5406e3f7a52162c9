"""Exact Bayes answers on the staged design: where each factor is lost, and the best possible denoiser.

The staged variant (:mod:`data_shards.synthetic_staged`) is a finite set of equally likely images
μ_1..μ_K (K = 8,192), so given x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε the posterior over combinations is exact:

    log p(k | x_t) = const + (√ᾱ_t / (1−ᾱ_t))·⟨x_t, μ_k⟩ − (ᾱ_t / (2(1−ᾱ_t)))·‖μ_k‖².

From it: the posterior of each factor's true value (a factor is *lost* at the first t where its
normalised skill (P(true) − 1/n)/(1 − 1/n) drops below 0.5), and the posterior-mean denoiser
ε*(x_t) = (x_t − √ᾱ_t·E[x0 | x_t]) / √(1−ᾱ_t), whose MSE is the lowest any ε-network can reach.
Everything is in float64: at t = 0 the logits' scale is ~10⁴.
"""
from __future__ import annotations

import numpy as np
import torch

from data_shards import synthetic_staged as S

from ..config import DiffusionConfig
from ..diffusion import make_schedule

LOST_SKILL = 0.5
STAGE_BOUNDS = (250, 500, 1000)


def alphas_cumprod() -> torch.Tensor:
    """The engine's schedule (float32 cumulative product), as float64."""
    return make_schedule(DiffusionConfig()).alphas_cumprod.double()


def to_model(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float64 N×3×H×W in [-1, 1] (the engine's x/127.5 − 1)."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).double() / 127.5 - 1.0


class Design:
    """The K enumerated images (model units, flattened) and their factor values."""

    def __init__(self):
        self.values = S.combination_values(np.arange(S.NUM_COMBINATIONS))            # K×F
        self.means = to_model(S.all_images()).reshape(S.NUM_COMBINATIONS, -1)           # K×D float64
        self.sq = (self.means ** 2).sum(1)
        self.ac = alphas_cumprod()

    def log_posterior(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """B×D noisy images at per-sample t -> B×K log posterior."""
        a = self.ac[t][:, None]
        logits = (a.sqrt() / (1 - a)) * (xt.double() @ self.means.T) - (a / (2 * (1 - a))) * self.sq[None]
        return torch.log_softmax(logits, dim=1)

    def factor_skill(self, logp: torch.Tensor, true_values: np.ndarray) -> np.ndarray:
        """B×F normalised skill of the posterior on each factor's true value."""
        p = logp.exp()
        out = np.empty((len(true_values), len(S.LEVELS)))
        for f, n in enumerate(S.LEVELS):
            match = torch.from_numpy(self.values[None, :, f] == true_values[:, f, None])
            pt = (p * match).sum(1).numpy()
            out[:, f] = (pt - 1.0 / n) / (1.0 - 1.0 / n)
        return out

    def posterior_mean_eps(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact E[ε | x_t], B×D."""
        x0 = self.log_posterior(xt, t).exp() @ self.means
        a = self.ac[t][:, None]
        return (xt.double() - a.sqrt() * x0) / (1 - a).sqrt()


def lost_steps(design: Design, values: np.ndarray, t_grid: np.ndarray, seed: int = 0,
               batch: int = 128) -> np.ndarray:
    """N×F: for each image (its factor values) the first t on ``t_grid`` where a factor's exact
    posterior skill falls below 0.5 (one ε per image, shared by every t); 1000 when never lost."""
    g = torch.Generator().manual_seed(seed)
    idx = S.combination_index(values)
    out = np.full(values.shape, 1000, np.int64)
    for a in range(0, len(values), batch):
        x0 = design.means[idx[a:a + batch]]
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        for t in t_grid:
            tt = torch.full((len(x0),), int(t), dtype=torch.long)
            a_t = design.ac[tt][:, None]
            xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
            skill = design.factor_skill(design.log_posterior(xt, tt), values[a:a + batch])
            block = out[a:a + batch]
            newly = (skill < LOST_SKILL) & (block == 1000)
            block[newly] = int(t)
    return out


def stage_of(t: float) -> int:
    """1-based stage of a time-step under the claim preset's boundaries."""
    return next(i + 1 for i, b in enumerate(STAGE_BOUNDS) if t < b)


def design_table(design: Design, n_images: int = 512, seed: int = 0, t_step: int = 10) -> dict:
    """Per factor: ‖Δ‖ between values (median over image pairs differing only there), the pairwise
    survival t (√(ᾱ/(1−ᾱ))·‖Δ‖ = 1), and the exact Bayes lost-t percentiles over images."""
    rng = np.random.default_rng(seed)
    values = S.draw_values(seed + 1000, np.arange(n_images))
    lost = lost_steps(design, values, np.arange(0, 1000, t_step), seed=seed)
    ac = design.ac.numpy()
    snr_sqrt = np.sqrt(ac / (1 - ac))
    table = {}
    for f, (name, *_rest) in enumerate(S.FACTORS):
        other = S.redraw(values, f, rng)
        d = (design.means[S.combination_index(values)] - design.means[S.combination_index(other)]).norm(dim=1).numpy()
        dn = float(np.median(d))
        pairwise = int(np.argmax(snr_sqrt * dn < 1.0)) if (snr_sqrt * dn < 1.0).any() else 1000
        p10, p50, p90 = (float(np.percentile(lost[:, f], q)) for q in (10, 50, 90))
        table[name] = {"values": int(S.LEVELS[f]), "scale": S.ATTRIBUTES[f]["scale"],
                       "designed_stage": S.ATTRIBUTES[f]["designed_stage"], "delta_l2_median": dn,
                       "pairwise_survival_t": pairwise, "lost_t_p10": p10, "lost_t_p50": p50, "lost_t_p90": p90,
                       "lost_stage": stage_of(p50)}
    return {"images": n_images, "t_step": t_step, "skill_threshold": LOST_SKILL, "factors": table}


def bayes_eps_mse(design: Design, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the exact posterior-mean ε predictor on the given x0 (model units), t, ε."""
    a = design.ac[t].reshape(-1, 1)
    x0f = x0.double().reshape(len(x0), -1)
    ef = eps.double().reshape(len(x0), -1)
    xt = a.sqrt() * x0f + (1 - a).sqrt() * ef
    return ((design.posterior_mean_eps(xt, t) - ef) ** 2).mean(1)
