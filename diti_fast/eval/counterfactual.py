"""Counterfactuals, interpolation and reconstruction with the masked DDIM (docs/method.md §6-7).

The algebra is kept in small pure functions: :func:`swap_chunks` mixes a dim range of z2 into z1 and
:func:`slerp` interpolates the inverted noises. For chunks [i, i+w), K = Σ k_masks[i:i+w] is the 0/1
indicator of dims [E_{i-1}, E_{i+w-1}), and z12 = z1 - z1⊙K + lerp(z1⊙K, z2⊙K, α). The sampler is the
original's masked guided DDIM: inversion x0 -> x_T with z, then the reverse pass from the mixed
(x_T, z) back to an image.
"""
from __future__ import annotations

import torch

from ..diffusion import make_schedule
from ..weights import Exported
from ..masks import TimestepMasks
from ..sampling import masked_ddim
from .features import EvalError

DEFAULT_LOC = (2, 16, 24, 32)
DEFAULT_WIDTH = (4, 8, 8, 32)
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1.0 - alpha) * a + alpha * b


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation per sample on the flattened tensors (dim 0 is the batch).

    Keeps the norm of Gaussian noise roughly constant along the path, which lerp would shrink (lerp of
    two independent N(0, I) draws at α = .5 has 1/√2 of their norm and decodes to a blurred image).
    Falls back to lerp when the two are (anti)parallel, where the formula divides by sin θ ≈ 0.
    """
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    ok = sin > eps
    safe = torch.where(ok, sin, torch.ones_like(sin))
    wa = torch.where(ok, torch.sin((1.0 - alpha) * theta) / safe, torch.full_like(sin, 1.0 - alpha))
    wb = torch.where(ok, torch.sin(alpha * theta) / safe, torch.full_like(sin, alpha))
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)


def chunk_dims(end_dims: torch.Tensor | list[int], lo_chunk: int, hi_chunk: int) -> tuple[int, int]:
    """Chunks [lo, hi) -> dims [E_{lo-1}, E_{hi-1}); like the original, the range is clipped to [0, k)."""
    ends = [int(e) for e in end_dims]
    k = len(ends)
    lo, hi = max(lo_chunk, 0), min(hi_chunk, k)
    if lo >= hi:
        raise EvalError(f"chunk range [{lo_chunk}, {hi_chunk}) is empty for k={k} chunks")
    return (ends[lo - 1] if lo else 0), ends[hi - 1]


def swap_chunks(z1: torch.Tensor, z2: torch.Tensor, lo_dim: int, hi_dim: int, alpha: float) -> torch.Tensor:
    """z1 with dims [lo_dim, hi_dim) moved a fraction α of the way to z2: α = 0 gives z1, α = 1 gives z2
    on the range and z1 elsewhere."""
    K = torch.zeros(z1.shape[-1], dtype=z1.dtype, device=z1.device)
    K[lo_dim:hi_dim] = 1
    return z1 - z1 * K + lerp(z1 * K, z2 * K, alpha)


class Sampler:
    """A DiTi export with its schedule and masks: encode, invert, decode."""

    def __init__(self, ex: Exported, device="cpu"):
        if ex.encoder is None or ex.decoder is None:
            raise EvalError(f"counterfactuals need a DiTi export (encoder + decoder), got stage {ex.stage!r}")
        cfg = ex.model_cfg
        self.ex, self.device = ex, torch.device(device)
        self.sched = make_schedule(cfg.diffusion, self.device)
        # A PDAE run trained its decoder on the whole z at every t: sample it as the original does,
        # without DiTi's time-step masks (None = unmasked in masked_ddim).
        self.pdae = (ex.config.get("diti") or {}).get("mode") == "pdae"
        self.masks = None if self.pdae else TimestepMasks.build(cfg.masks, cfg.unet.latent_dim,
                                                                cfg.diffusion.timesteps, self.device)
        self._k_masks = TimestepMasks.build(cfg.masks, cfg.unet.latent_dim, cfg.diffusion.timesteps, self.device)

    @property
    def end_dims(self) -> list[int]:
        return self._k_masks.end_dims.tolist()  # the chunk layout, also for a PDAE run's z

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.ex.encoder(x0)

    def invert(self, x0: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
        return masked_ddim(self.ex.decoder, x0, z, self.sched, self.masks, steps=steps, inverse=True)

    def decode(self, x_T: torch.Tensor, z: torch.Tensor, steps: int, batch: int = 64,
               masked: bool = True) -> torch.Tensor:
        masks = self.masks if masked else None
        return torch.cat([masked_ddim(self.ex.decoder, x_T[i:i + batch], z[i:i + batch], self.sched, masks,
                                      steps=steps, inverse=False) for i in range(0, len(x_T), batch)])


def _check_steps(sampler: Sampler, *steps: int) -> None:
    T = sampler.sched.timesteps
    for s in steps:
        if not 1 <= s <= T:
            raise EvalError(f"DDIM steps must be in [1, {T}], got {s}")


def counterfactuals(sampler: Sampler, x1: torch.Tensor, x2: torch.Tensor, ranges: list[tuple[int, int]],
                    alphas=DEFAULT_ALPHAS, steps: int = 100, invert_steps: int = 100, mirror: bool = True,
                    slerp_noise: bool = True):
    """Rows of counterfactuals for one image pair ([1,3,H,W] each). For each chunk range: z1 receiving
    z2's chunks with x_T = slerp(x_T1, x_T2, α) ("A←B") and, with ``mirror``, the same for z2 ("B←A").
    ``slerp_noise=False`` keeps the row image's own x_T (the original's ``lerpT=False``): then only the
    chunk range changes, which isolates what it encodes; with the slerp, α = 1 is mostly B whatever
    the range, since the inverted x_T alone nearly determines a DDIM decode.
    Returns images [R, len(alphas), 3, H, W] and the row labels."""
    _check_steps(sampler, steps, invert_steps)
    x = torch.cat([x1, x2])
    z = sampler.encode(x)
    xT = sampler.invert(x, z, invert_steps)
    jobs: dict = {}  # identical (z, x_T) inputs are decoded once: every α = 0 cell is (z_a, x_T_a)
    cells, labels = [], []
    for lo, hi in ranges:
        dlo, dhi = chunk_dims(sampler.end_dims, lo, hi)
        for a, b, name in ((0, 1, "A←B"), (1, 0, "B←A"))[: 2 if mirror else 1]:
            row = []
            for al in alphas:
                key = ("base", a) if al == 0 else (a, dlo, dhi, float(al))
                if key not in jobs:
                    jobs[key] = (swap_chunks(z[a:a + 1], z[b:b + 1], dlo, dhi, al),
                                 slerp(xT[a:a + 1], xT[b:b + 1], al) if slerp_noise else xT[a:a + 1])
                row.append(list(jobs).index(key))
            cells.append(row)
            labels.append(f"{name} chunks {lo}-{hi} z[{dlo}:{dhi}]")
    zs, ts = zip(*jobs.values())
    imgs = sampler.decode(torch.cat(ts), torch.cat(zs), steps)
    idx = torch.tensor(cells, device=imgs.device)
    return imgs[idx.reshape(-1)].reshape(len(labels), len(alphas), *imgs.shape[1:]), labels


def interpolation(sampler: Sampler, x1: torch.Tensor, x2: torch.Tensor, chunk_range: tuple[int, int] | None,
                  alphas, steps: int = 100, invert_steps: int = 100):
    """One row from image A to image B: z lerped on the chunk range (all of z by default), x_T slerped."""
    k = len(sampler.end_dims)
    lo, hi = chunk_range if chunk_range is not None else (0, k)
    return counterfactuals(sampler, x1, x2, [(lo, hi)], alphas, steps, invert_steps, mirror=False)


def reconstructions(sampler: Sampler, x0: torch.Tensor, steps: int = 100, invert_steps: int = 100,
                    seed: int = 0, ddpm_row: bool = False):
    """Rows: input, reconstruction from the inverted x_T, decoding of z from fresh noise (what z alone
    fixes) and, with ``ddpm_row``, the frozen DDPM alone from the inverted x_T (what the noise fixes).
    Returns (rows [R, N, 3, H, W], row labels, reconstruction MSE in [-1, 1] units)."""
    _check_steps(sampler, steps, invert_steps)
    z = sampler.encode(x0)
    xT = sampler.invert(x0, z, invert_steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    both = sampler.decode(torch.cat([xT, noise]), torch.cat([z, z]), steps)
    rec, fresh = both[: len(x0)], both[len(x0):]
    rows = [x0.clamp(-1, 1), rec, fresh]
    labels = ["input", "reconstruction", "z, fresh noise"]
    if ddpm_row:
        rows.append(masked_ddim(sampler.ex.decoder, xT, None, sampler.sched, None, steps=steps, inverse=False))
        labels.append("DDPM alone, inverted x_T")
    mse = ((rec - x0) ** 2).mean().item()
    return torch.stack(rows), labels, mse
