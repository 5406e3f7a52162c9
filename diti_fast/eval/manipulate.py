"""Attribute manipulation: move z along a linear classifier's direction and decode (the original's
eval/manipulation.py, notebooks/exp_manip.py and GaussianDiffusion.manipulation_sample).

Pipeline, per attribute:

1. latent statistics: mean and (unbiased) std of z over the training split; the classifier and the
   edit live in standardised coordinates u = (z - mean) / std;
2. a sparsity mask per direction: the ``mask_dims`` dims with the largest d′ = |μ₁ - μ₀| / √((σ₁² + σ₀²)/2)
   of u between the positive and the negative images (0 = all dims);
3. a linear classifier on masked u: BCE-with-logits, one logit per direction (a binary attribute has
   one direction, a categorical one a one-vs-rest direction per class), Adam 1e-4, batch 128
   shuffled, 10 epochs, an EMA of its weights with decay 0.999;
4. the edit u' = u + s·√D·ŵ with ŵ the unit EMA weight row (zero outside the mask), z' = u'·std + mean;
5. decoding: DDIM inversion of the input with its own z, then the guided DDIM from that x_T with z',
   both *unmasked* (every time-step sees the whole z), as the original's manipulation_sample does.

Where this departs from the released code, on purpose (docs/evaluation.md lists them):

* The release's sparsity mask is a learned ProMask (Gumbel-sigmoid scores annealed towards
  ``promask`` dims, re-drawn at random by ``fix_subnet`` when loaded). Here the dims are chosen once,
  deterministically, by d′: the same budget of dims, no randomness between the training and the edit.
* The release saves the raw classifier and never reads its EMA copy; here the EMA is what edits and
  scores (decay 0.999), with the (1 + n)/(10 + n) warm-up so that a few hundred steps on a
  small set do not leave the EMA at its random initialisation (no effect after ~10k steps).
* The release's notebook calls ``manipulation_sample(..., verbose=False)`` and an eval helper passes
  ``class_id``: neither exists in its sampler's signature, so the release path crashes; this is the
  sampler it meant (step 5), on this project's masked-DDIM discretisation.
* Categorical attributes are one-vs-rest BCE directions, so each class's score is that classifier's
  own sigmoid probability, as for a binary attribute.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.ema import warmup_decay
from ..grids import save_grid
from ..sampling import masked_ddim
from .counterfactual import Sampler, _check_steps
from .features import (EvalError, FeatureSet, _cache_key, cached_features, load_images, load_run, resolve_export,
                       run_dir_of, shard_spec, split_by_position)
from .jsonable import jsonable


@dataclass
class ManipConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    ema_decay: float = 0.999
    mask_dims: int = 16     # the notebook's promask=16; 0 = no mask
    seed: int = 0

    def validate(self, latent_dim: int) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise EvalError("manipulation classifier: --epochs and --batch-size must be >= 1 and --lr > 0")
        if not 0 <= self.ema_decay < 1:
            raise EvalError(f"manipulation classifier: EMA decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.mask_dims <= latent_dim:
            raise EvalError(f"--mask-dims must be in [0, {latent_dim}] (0 = all dims), got {self.mask_dims}")


# --------------------------------------------------------------------------- attribute → targets

@dataclass
class Directions:
    """What the edits need for one attribute: statistics, masks and the EMA classifier."""
    attribute: str
    kind: str
    names: list[str]          # one per direction: the attribute (binary) or its classes (categorical)
    mean: np.ndarray          # [D]
    std: np.ndarray           # [D]
    mask: np.ndarray          # [R, D] 0/1
    weight: np.ndarray        # [R, D] EMA weight rows, already multiplied by the mask
    bias: np.ndarray          # [R]
    train_accuracy: list[float]
    test_ap: list[float | None]

    def unit(self, r: int) -> np.ndarray:
        w = self.weight[r].astype(np.float64)
        n = np.linalg.norm(w)
        if n == 0:
            raise EvalError(f"the classifier of {self.names[r]!r} has a zero weight vector: no direction to edit")
        return w / n

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - torch.as_tensor(self.mean, device=z.device, dtype=z.dtype)) / \
            torch.as_tensor(self.std, device=z.device, dtype=z.dtype)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier's probabilities [N, R] for raw latents z [N, D]."""
        u = self.standardise(z.float())
        w = torch.as_tensor(self.weight, device=z.device, dtype=torch.float32)
        b = torch.as_tensor(self.bias, device=z.device, dtype=torch.float32)
        return torch.sigmoid(u @ w.T + b)

    def edit(self, z: torch.Tensor, r: int, scale: float) -> torch.Tensor:
        """z' = denormalise(normalise(z) + scale·√D·ŵ_r)."""
        d = z.shape[-1]
        step = torch.as_tensor(self.unit(r) * (scale * math.sqrt(d)), device=z.device, dtype=z.dtype)
        sd = torch.as_tensor(self.std, device=z.device, dtype=z.dtype)
        return z + step * sd

    def to_npz(self, path: Path) -> None:
        tmp = path.with_name(path.stem + ".tmp.npz")
        meta = {k: getattr(self, k) for k in ("attribute", "kind", "names", "train_accuracy", "test_ap")}
        np.savez(tmp, mean=self.mean, std=self.std, mask=self.mask, weight=self.weight, bias=self.bias,
                 meta=np.array(json.dumps(meta)))
        tmp.replace(path)

    @classmethod
    def from_npz(cls, path: Path) -> "Directions":
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            return cls(mean=f["mean"], std=f["std"], mask=f["mask"], weight=f["weight"], bias=f["bias"], **meta)


def attribute_targets(attributes: list[dict], attrs: np.ndarray, name: str) -> tuple[str, list[str], np.ndarray]:
    """(kind, direction names, 0/1 targets [N, R]) of attribute ``name`` in a manifest's table."""
    names = [a["name"] for a in attributes]
    if name not in names:
        raise EvalError(f"attribute {name!r} is not in the data's manifest; it has: {', '.join(names) or 'none'}")
    i = names.index(name)
    a = attributes[i]
    col = attrs[:, i]
    if a.get("kind") == "binary":
        return "binary", [name], (col > 0).astype(np.float32)[:, None]
    if a.get("kind") == "categorical":
        k = int(a["num_classes"])
        classes = [str(c) for c in a.get("classes") or range(k)]
        ids = np.rint(col).astype(np.int64)
        return "categorical", classes, (ids[:, None] == np.arange(k)[None, :]).astype(np.float32)
    raise EvalError(f"attribute {name!r} is {a.get('kind')!r}: manipulation needs a binary or categorical "
                    "attribute (a direction per class); continuous ones go to `eval regress`")


def latent_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased std per dim (torch's Tensor.std, as the original's stats.pt); a constant dim
    gets std 1 so standardising it is a no-op instead of a division by zero."""
    zz = z.astype(np.float64)
    sd = zz.std(0, ddof=1) if len(zz) > 1 else np.ones(zz.shape[1])
    return zz.mean(0).astype(np.float32), np.where(sd > 0, sd, 1.0).astype(np.float32)


def d_prime(u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sensitivity index per dim of standardised latents u [N, D] for 0/1 labels y [N]:
    |μ₁ - μ₀| / √((σ₁² + σ₀²)/2); 0 where a side is empty or both variances vanish."""
    pos, neg = u[y > 0.5].astype(np.float64), u[y <= 0.5].astype(np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return np.zeros(u.shape[1])
    pooled = np.sqrt((pos.var(0) + neg.var(0)) / 2)
    diff = np.abs(pos.mean(0) - neg.mean(0))
    return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), 0.0)


def top_dims_mask(u: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """0/1 [D] keeping the k dims of largest d′ (ties: lower index first); k = 0 keeps all."""
    d = u.shape[1]
    if k <= 0 or k >= d:
        return np.ones(d, np.float32)
    order = np.argsort(-d_prime(u, y), kind="stable")
    m = np.zeros(d, np.float32)
    m[order[:k]] = 1
    return m


def train_directions(u: np.ndarray, y: np.ndarray, mask: np.ndarray, cfg: ManipConfig) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """EMA weights [R, D] (masked), biases [R] and the raw classifier's training accuracy per direction."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clf = nn.Linear(u.shape[1], y.shape[1])
    ema = copy.deepcopy(clf).requires_grad_(False)
    m = torch.from_numpy(mask)
    x, t = torch.from_numpy(u.astype(np.float32)), torch.from_numpy(y)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    n = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            # Each direction's logit reads only its masked dims: W ⊙ M instead of masking the input.
            loss = F.binary_cross_entropy_with_logits(x[idx] @ (clf.weight * m).T + clf.bias, t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay = warmup_decay(cfg.ema_decay, n)
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), clf.parameters()):
                    pe.mul_(decay).add_(p, alpha=1 - decay)
            n += 1
    with torch.no_grad():
        acc = (((x @ (clf.weight * m).T + clf.bias) > 0).float() == t).float().mean(0).tolist()
        return (ema.weight * m).numpy(), ema.bias.numpy().copy(), acc


def fit_directions(train: FeatureSet, test: FeatureSet | None, attribute: str, cfg: ManipConfig) -> Directions:
    """Statistics, d′ masks and the EMA classifier of ``attribute`` from cached features."""
    cfg.validate(train.z.shape[1])
    kind, names, y = attribute_targets(train.attributes, train.attrs, attribute)
    empty = [n for n, c in zip(names, y.sum(0)) if c == 0 or c == len(y)]
    if empty:
        raise EvalError(f"attribute {attribute!r}: the training split has no positive or no negative image for "
                        f"{', '.join(map(repr, empty))}; a classifier cannot be trained")
    mean, std = latent_stats(train.z)
    u = (train.z - mean) / std
    mask = np.stack([top_dims_mask(u, y[:, r], cfg.mask_dims) for r in range(y.shape[1])])
    weight, bias, acc = train_directions(u, y, mask, cfg)
    d = Directions(attribute, kind, names, mean, std, mask, weight, bias, acc, [None] * len(names))
    if test is not None and len(test):
        from sklearn.metrics import average_precision_score  # lazy: sklearn, ~1 s
        _, _, yt = attribute_targets(test.attributes, test.attrs, attribute)
        p = d.scores(torch.from_numpy(test.z)).numpy()
        d.test_ap = [float(average_precision_score(yt[:, r], p[:, r])) if 0 < yt[:, r].sum() < len(yt) else None
                     for r in range(len(names))]
    return d


def directions_cache_key(feature_cache: str, attribute: str, cfg: ManipConfig) -> str:
    ident = {"features": feature_cache, "attribute": attribute, "cfg": asdict(cfg)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_directions(cache_dir: Path, key: str, fit, log=print) -> tuple[Directions, bool]:
    """(directions, whether they came from the cache) under ``cache_dir/directions-KEY.npz``."""
    path = cache_dir / f"directions-{key}.npz"
    if path.is_file():
        log(f"classifier and statistics from {path}")
        return Directions.from_npz(path), True
    d = fit()
    cache_dir.mkdir(parents=True, exist_ok=True)
    d.to_npz(path)
    log(f"classifier and statistics cached in {path}")
    return d, False


# --------------------------------------------------------------------------- edits

@torch.no_grad()
def invert_unmasked(sampler, x0: torch.Tensor, invert_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x_T): the inputs' latents and their DDIM inversion guided by the whole z at every t."""
    z = sampler.encode(x0)
    return z, masked_ddim(sampler.ex.decoder, x0, z, sampler.sched, None, steps=invert_steps, inverse=True)


@torch.no_grad()
def manipulate(sampler, x0: torch.Tensor, d: Directions, r: int, scales, steps: int = 100,
               invert_steps: int = 1000, inverted: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edited images [N, S, 3, H, W] of ``x0`` [N, 3, H, W] along direction ``r``, with the classifier's
    scores of the inputs [N] and of the edited images [N, S] (re-encoded by the same encoder).
    ``inverted``: (z, x_T) of :func:`invert_unmasked`, to share one inversion between directions."""
    z, x_T = inverted if inverted is not None else invert_unmasked(sampler, x0, invert_steps)
    zs = torch.cat([d.edit(z, r, float(s)) for s in scales])
    imgs = sampler.decode(x_T.repeat(len(scales), 1, 1, 1), zs, steps, masked=False)
    n, s = len(x0), len(scales)
    imgs = imgs.reshape(s, n, *x0.shape[1:]).transpose(0, 1)
    edited = d.scores(sampler.encode(imgs.reshape(n * s, *x0.shape[1:])))[:, r].reshape(n, s)
    return imgs, d.scores(z)[:, r], edited


def moved_fraction(input_scores: torch.Tensor, edited: torch.Tensor, scales) -> dict:
    """Per image: did the score go the way of the scale? ``up``: the largest positive scale's score
    exceeds the input's; ``down``: the most negative scale's score is below it."""
    sc = list(map(float, scales))
    out = {}
    if max(sc) > 0:
        out["up"] = float((edited[:, sc.index(max(sc))] > input_scores).float().mean())
    if min(sc) < 0:
        out["down"] = float((edited[:, sc.index(min(sc))] < input_scores).float().mean())
    return out


# A mean absolute change below this many grey levels (of 255) between the edited image and the
# unedited one is not visible: the edit is reported as having no visible effect.
VISIBLE_GREY_LEVELS = 2.0


def effect_summary(input_scores: torch.Tensor, edited: torch.Tensor, imgs: torch.Tensor, x0: torch.Tensor,
                   scales) -> dict:
    """Per scale: the classifier score's change from the input (mean and standard deviation over the
    images) and the images' mean absolute pixel change in grey levels (0-255) from the unedited
    decode (the s=0 column when there is one, else the input). ``imgs`` [N, S, 3, H, W], ``x0``
    [N, 3, H, W], both in [-1, 1]."""
    sc = list(map(float, scales))
    ref = imgs[:, sc.index(0.0)] if 0.0 in sc else x0
    delta = (edited - input_scores[:, None]).double()
    out = {}
    for j, s in enumerate(sc):
        d = delta[:, j]
        px = float((imgs[:, j] - ref).abs().mean() * 127.5)
        out[f"{s:g}"] = {"score_change_mean": float(d.mean()),
                         "score_change_std": float(d.std(unbiased=False)) if len(d) > 1 else 0.0,
                         "pixel_change": px, "visible": px >= VISIBLE_GREY_LEVELS}
    return out


def describe_effect(tag: str, summary: dict, n: int) -> str:
    """One line per edit: the mean score change ± its spread at the extreme scales, and whether the
    images changed visibly (a score can move while the picture does not)."""
    parts = []
    scales = sorted(summary, key=float)
    for s in dict.fromkeys((scales[0], scales[-1])):
        e = summary[s]
        if float(s) == 0.0:
            continue
        text = (f"s={float(s):+g}: score {e['score_change_mean']:+.3f} ± {e['score_change_std']:.3f} "
                f"(mean ± sd over {n} image{'s' if n != 1 else ''}), pixels {e['pixel_change']:.1f}/255")
        if not e["visible"]:
            text += " (no visible effect)"
        parts.append(text)
    line = f"{tag}: " + "; ".join(parts)
    if parts and not any(summary[s]["visible"] for s in summary if float(s) != 0.0):
        line += (f" -- the edit has no visible effect (under {VISIBLE_GREY_LEVELS:g} grey levels): "
                 "try larger --scales")
    return line


# --------------------------------------------------------------------------- the command

def run_manipulation(run, data, attribute: str, scales, device, cfg=None, positions=None, num: int = 4,
                     classes=None, steps: int = 100, invert_steps: int = 1000, max_samples=None,
                     feature_batch: int = 256, out_dir=None, log=print) -> dict:
    """Fit (or reuse) the attribute's directions, edit images, write one grid + one JSON per direction.
    Returns the JSON data; also the engine of the report's manipulation grid."""
    cfg = cfg or ManipConfig()
    if not scales:
        raise EvalError("--scales is empty")
    # A missing or continuous attribute, or an unknown class, fails before any model or feature work.
    attributes = shard_spec(data).attributes
    _, names, _ = attribute_targets(attributes, np.zeros((0, len(attributes)), np.float32), attribute)
    unknown = [c for c in classes or [] if c not in names]
    if unknown:
        raise EvalError(f"--class {', '.join(unknown)}: {attribute!r} has classes {', '.join(names)}")
    export_file = resolve_export(run)
    ex = load_run(export_file, device)
    cfg.validate(ex.model_cfg.unet.latent_dim)
    sampler = Sampler(ex, device)
    _check_steps(sampler, steps, invert_steps)
    fs = cached_features(export_file, data, ex.encoder, device, feature_batch, max_samples, log=log)
    parts = split_by_position(fs, ("train", "test"))
    root = run_dir_of(export_file) / "eval" / "manipulate"
    key = directions_cache_key(_cache_key(export_file, data, max_samples), attribute, cfg)
    d, cached = cached_directions(root, key, lambda: fit_directions(parts["train"], parts["test"], attribute, cfg),
                                  log=log)
    rows = [d.names.index(c) for c in classes] if classes else list(range(len(d.names)))
    pos = list(positions) if positions else [int(p) for p in parts["test"].position[:num]]
    x = load_images(data, pos, device)
    inverted = invert_unmasked(sampler, x, invert_steps)
    out_dir = Path(out_dir) if out_dir else root
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"attribute": attribute, "kind": d.kind, "scales": list(map(float, scales)), "positions": pos,
              "config": cfg.__dict__, "cached": cached, "steps": steps, "invert_steps": invert_steps,
              "classifier": {"names": d.names, "train_accuracy": d.train_accuracy, "test_ap": d.test_ap,
                             "mask_dims": [int(m.sum()) for m in d.mask]}, "directions": {}}
    for r in rows:
        name = d.names[r]
        imgs, s_in, s_out = manipulate(sampler, x, d, r, scales, steps, invert_steps, inverted)
        tag = attribute if d.kind == "binary" else f"{attribute}={name}"
        stem = "manipulate_" + "".join(c if c.isalnum() or c in "-_=." else "_" for c in tag)
        grid = torch.cat([x.clamp(-1, 1)[:, None], imgs], dim=1)  # the input as the first column
        save_grid(out_dir / f"{stem}.png", grid, [f"#{p} ({a:.2f})" for p, a in zip(pos, s_in.tolist())],
                  ["input"] + [f"s={s:g}" for s in scales],
                  title=f"{tag}: z + s·√D·ŵ, {invert_steps} inversion / {steps} DDIM steps, unmasked")
        effect = effect_summary(s_in, s_out, imgs, x, scales)
        result["directions"][name] = {"grid": str(out_dir / f"{stem}.png"), "input_scores": s_in.tolist(),
                                      "scores": s_out.tolist(), "moved": moved_fraction(s_in, s_out, scales),
                                      "effect": effect}
        log(f"{describe_effect(tag, effect, len(pos))}; wrote {out_dir / (stem + '.png')}")
    stem = "manipulate_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in attribute)
    (out_dir / f"{stem}.json").write_text(json.dumps(jsonable(result), indent=1))
    result["json"] = str(out_dir / f"{stem}.json")
    return result


__all__ = ["ManipConfig", "Directions", "attribute_targets", "latent_stats", "d_prime", "top_dims_mask",
           "train_directions", "fit_directions", "cached_directions", "directions_cache_key", "invert_unmasked",
           "manipulate", "moved_fraction", "effect_summary", "describe_effect", "run_manipulation"]
