"""What the claim measures on trained models, all on held-out images rendered from factor values.

* :func:`stage_distances`: the encoder's squared stage distances for the stage-share metric;
* :func:`heldout_losses`: DiTi's weighted loss per t-bucket with the image's own z, with z shuffled
  across the batch, and with one stage's dims shuffled (does the decoder use z, and which part);
* :func:`ddpm_vs_bayes`: the DDPM's ε-MSE per t-bucket beside the exact posterior-mean denoiser's;
* :func:`sample_validity`: DDPM samples against the nearest of the design's 8,192 images.

t and ε come from seeded generators, so every arm is measured on the same noisy images.
"""
from __future__ import annotations

import numpy as np
import torch

from data_shards import synthetic_staged as S

from ..config import DiffusionConfig
from ..data import to_model_input
from ..diffusion import at_t, make_schedule, q_sample
from ..losses import conditioning, weighted_shift_loss_ref
from ..masks import TimestepMasks
from .bayes import Design, bayes_eps_mse
from .stage_share import Distances, distances, stage_slices
from ..eval.sample import ddpm_samples

BUCKETS = 10


def images(values: np.ndarray) -> torch.Tensor:
    """Factor values -> model input (N×3×16×16 in [-1, 1]) through the shards' uint8 layout."""
    u8 = torch.from_numpy(S.render_uint8(values)).permute(0, 3, 1, 2).contiguous()
    return to_model_input(u8, "cpu")


@torch.no_grad()
def encode(encoder, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch]).float() for i in range(0, len(x), batch)]).numpy()


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: each image's partner is another image."""
    order = rng.permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, 1)
    return out


def intervention_set(values: np.ndarray, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """For each factor, the test values with only that factor redrawn; and each image's partner."""
    rng = np.random.default_rng(seed)
    redrawn = [S.redraw(values, f, rng) for f in range(len(S.LEVELS))]
    return redrawn, derangement(len(values), rng)


def stage_distances(encode_fn, values: np.ndarray, dims_per_stage, seed: int = 0) -> Distances:
    """``encode_fn(images) -> N×D`` (numpy) on x, on each x^f, and the partners y."""
    redrawn, partner = intervention_set(values, seed)
    z = encode_fn(images(values))
    zf = np.stack([encode_fn(images(v)) for v in redrawn])
    return distances(z, zf, partner, dims_per_stage)


def _draws(n: int, timesteps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, timesteps, (n,), generator=g)
    eps = torch.randn((n, 3, S.IMAGE_SIZE, S.IMAGE_SIZE), generator=g)
    return t, eps


def _buckets(per_sample: torch.Tensor, t: torch.Tensor, timesteps: int) -> list[float]:
    b = (t * BUCKETS) // timesteps
    return [float(per_sample[b == i].mean()) if (b == i).any() else float("nan") for i in range(BUCKETS)]


@torch.no_grad()
def heldout_losses(ex, values: np.ndarray, mode: str, dims_per_stage, seed: int = 0, batch: int = 256) -> dict:
    """DiTi's loss on held-out images: own z, z of another image (whole, and one stage at a time)."""
    cfg = ex.model_cfg
    sched = make_schedule(cfg.diffusion)
    masks = TimestepMasks.build(cfg.masks, cfg.unet.latent_dim, cfg.diffusion.timesteps)
    branch = "pdae" if mode == "pdae" else "base"   # stop_grad's conditioning has base's value
    x0 = images(values)
    t, eps = _draws(len(x0), cfg.diffusion.timesteps, seed)
    ex.encoder.eval()
    ex.decoder.eval()
    z = torch.from_numpy(encode(ex.encoder, x0))
    partner = torch.from_numpy(derangement(len(x0), np.random.default_rng(seed + 1)))
    variants = {"own": z, "shuffled": z[partner]}
    for k, sl in enumerate(stage_slices(dims_per_stage)):
        zk = z.clone()
        zk[:, sl] = z[partner][:, sl]
        variants[f"stage{k + 1}_shuffled"] = zk
    out = {}
    ddpm_only = []  # the frozen DDPM alone (its ε̂, G left out): what the decoder starts from
    for name, zv in variants.items():
        per = []
        for i in range(0, len(x0), batch):
            sl = slice(i, i + batch)
            xt = q_sample(sched, x0[sl], t[sl], eps[sl])
            eps_hat, g = ex.decoder(xt, t[sl], conditioning(zv[sl], t[sl], masks, branch))
            per.append(weighted_shift_loss_ref(eps[sl], eps_hat, g, t[sl], sched).float().mean((1, 2, 3)))
            if name == "own":  # ε̂ does not depend on z: one pass serves both
                ddpm_only.append((at_t(sched.weight, t[sl], 4) * (eps[sl] - eps_hat) ** 2).float().mean((1, 2, 3)))
        per = torch.cat(per)
        out[name] = {"loss": float(per.mean()), "buckets": _buckets(per, t, cfg.diffusion.timesteps)}
    per = torch.cat(ddpm_only)
    out["ddpm_only"] = {"loss": float(per.mean()), "buckets": _buckets(per, t, cfg.diffusion.timesteps)}
    out["shuffle_increase"] = out["shuffled"]["loss"] / out["own"]["loss"] - 1.0
    return out


@torch.no_grad()
def ddpm_vs_bayes(unet, design: Design, values: np.ndarray, seed: int = 0, batch: int = 256) -> dict:
    """ε-MSE per t-bucket of the DDPM and of the exact posterior-mean denoiser, same x0, t, ε."""
    unet.eval()
    sched = make_schedule(DiffusionConfig())
    x0 = images(values)
    t, eps = _draws(len(x0), 1000, seed)
    net, bayes = [], []
    for i in range(0, len(x0), batch):
        sl = slice(i, i + batch)
        pred = unet(q_sample(sched, x0[sl], t[sl], eps[sl]), t[sl])
        net.append(((pred.float() - eps[sl]) ** 2).mean((1, 2, 3)))
        bayes.append(bayes_eps_mse(design, x0[sl], t[sl], eps[sl]).float())
    net, bayes = torch.cat(net), torch.cat(bayes)
    return {"ddpm": _buckets(net, t, 1000), "bayes": _buckets(bayes, t, 1000),
            "bucket_edges": [1000 * i // BUCKETS for i in range(BUCKETS + 1)]}


def nearest_combination(design: Design, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each image's nearest design image: (combination index, RMS distance in model units)."""
    flat = x.double().reshape(len(x), -1)
    d2 = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ design.means.T + design.sq[None]
    k = d2.argmin(1)
    rms = (d2.gather(1, k[:, None]).squeeze(1).clamp_min(0) / flat.shape[1]).sqrt()
    return k.numpy(), rms.numpy()


def sample_validity(ex, design: Design, n: int, steps: int, max_rms: float, seed: int = 0) -> dict:
    """DDIM samples of the DDPM judged against the design: valid when the nearest combination is
    within ``max_rms`` (model units, RMS over pixels)."""
    x = ddpm_samples(ex, n, steps, seed=seed, image_size=S.IMAGE_SIZE)
    k, rms = nearest_combination(design, x)
    valid = rms <= max_rms
    return {"samples": n, "steps": steps, "max_rms": max_rms, "valid_fraction": float(valid.mean()),
            "rms_median": float(np.median(rms)), "distinct_combinations": int(len(set(k[valid].tolist()))),
            "images": x}


def probe_skills(z: np.ndarray, values: np.ndarray, dims_per_stage, seed: int = 0, random_draws: int = 5) -> dict:
    """Secondary metric: per factor, a logistic probe's normalised skill ((acc − 1/n)/(1 − 1/n), on
    the second half of the images after fitting on the first) from the first stage's dims, and
    from as many dims drawn at random from the whole latent (mean over ``random_draws`` draws)."""
    # lazy: sklearn, ~1 s, for this one secondary metric
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    half = len(z) // 2
    first = stage_slices(dims_per_stage)[0]
    width = first.stop - first.start

    def skill(cols, f):
        x = StandardScaler().fit(z[:half, cols]).transform(z[:, cols])
        y = values[:, f]
        if len(np.unique(y[:half])) < 2:
            return 0.0
        acc = LogisticRegression(max_iter=500).fit(x[:half], y[:half]).score(x[half:], y[half:])
        n = S.LEVELS[f]
        return float((acc - 1 / n) / (1 - 1 / n))

    out = {}
    for f, name in enumerate(S.NAMES):
        stage1 = skill(np.arange(first.start, first.stop), f)
        rand = float(np.mean([skill(rng.choice(z.shape[1], width, replace=False), f) for _ in range(random_draws)]))
        out[name] = {"first_stage": stage1, "random_dims": rand, "first_minus_random": stage1 - rand}
    return out
