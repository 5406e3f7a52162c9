"""The claim's primary metric, interventional stage share, and the decision rule.

For a test image x, a factor f and a stage s (the latent dims stage s unlocks):

    S(f, s) = E‖z_s(x) − z_s(x^f)‖² / E‖z_s(x) − z_s(y)‖²

where x^f is x with only f redrawn and y a random other test image. P(f, s) = S / Σ_s S is where
in the latent a change of f shows, and the factor's centre c_f = Σ_s s·P(f, s) (stages 1..3).
It does not ask whether f can be decoded, only where the encoder writes it.

    C   = mean c over coarse factors − mean c over fine factors        (one encoder)
    I   = C(DiTi) − C(PDAE)                                             (paired: the same x, x^f, y)

"Fine" and "coarse" are the factors the exact Bayes computation loses in the first and in the last
stage (:mod:`bayes`), decided before any training. Intervals come from a paired bootstrap over
test images: one resample of image indices serves every arm and seed.

The decision rule (:func:`decide`), fixed before the run:

* any gate failed -> "inconclusive";
* "reproduced": I > 0 with its 95% interval above 0 for every seed and pooled, pooled I ≥ 0.3
  stage, DiTi's Spearman(lost t, c_f) interval above 0 and PDAE's containing 0;
* "not reproduced": the pooled upper bound of I below 0.3;
* otherwise "inconclusive".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_EFFECT = 0.3      # stages: the smallest pooled I that counts as reproducing the claim
LEVEL = 0.95


@dataclass
class Distances:
    """One encoder on one test set: squared stage distances, per image."""
    to_factor: np.ndarray   # N×F×S  ‖z_s(x) − z_s(x^f)‖²
    to_other: np.ndarray    # N×S    ‖z_s(x) − z_s(y)‖²


def stage_slices(dims_per_stage) -> list[slice]:
    ends = np.cumsum([0, *dims_per_stage])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def distances(z: np.ndarray, z_factor: np.ndarray, partner: np.ndarray, dims_per_stage) -> Distances:
    """z: N×D of the test images; z_factor: F×N×D of the images with one factor redrawn;
    partner: N indices of each image's random other image."""
    sl = stage_slices(dims_per_stage)
    to_factor = np.stack([np.stack([((z[:, s] - zf[:, s]) ** 2).sum(1) for s in sl], 1) for zf in z_factor], 1)
    to_other = np.stack([((z[:, s] - z[partner][:, s]) ** 2).sum(1) for s in sl], 1)
    return Distances(to_factor.astype(np.float64), to_other.astype(np.float64))


def shares(d: Distances, idx: np.ndarray | None = None) -> np.ndarray:
    """F×S stage shares P(f, s) over the images ``idx`` (all when None)."""
    tf = d.to_factor if idx is None else d.to_factor[idx]
    to = d.to_other if idx is None else d.to_other[idx]
    s = tf.mean(0) / np.maximum(to.mean(0), 1e-30)[None, :]
    return s / np.maximum(s.sum(1, keepdims=True), 1e-30)


def centres(p: np.ndarray) -> np.ndarray:
    """F centres c_f = Σ_s s·P(f, s), stages numbered from 1."""
    return p @ np.arange(1, p.shape[1] + 1, dtype=np.float64)


def sensitivity(d: Distances) -> np.ndarray:
    """F: how far redrawing f moves the whole z, E‖z(x) − z(x^f)‖² / E‖z(x) − z(y)‖². A factor the
    encoder ignores has ~0 here, and its stage shares are then about noise, not about where it lives."""
    return d.to_factor.sum(2).mean(0) / max(float(d.to_other.sum(1).mean()), 1e-30)


def contrast(c: np.ndarray, fine: list[int], coarse: list[int]) -> float:
    return float(np.mean(c[coarse]) - np.mean(c[fine]))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties; nan when either side is constant."""
    def rank(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ranks over ties
            m = v == val
            r[m] = r[m].mean()
        return r
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(samples, [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100])
    return [float(lo), float(hi)]


def analyse(arms: dict[str, list[Distances]], lost_t: np.ndarray, fine: list[int], coarse: list[int],
            diti_arms: list[str], baseline: str = "pdae", resamples: int = 2000, seed: int = 0,
            crossover: tuple[int, int] | None = None) -> dict:
    """Every number the decision needs, point estimates and paired-bootstrap intervals.

    ``arms``: arm -> one Distances per training seed (seed k of every arm is paired, and every
    Distances covers the same N test images). ``lost_t``: F exact-Bayes lost time-steps (medians).
    ``crossover``: (early-lost coarse-scale factor, late-lost fine-scale factor), to say whether an
    order follows noise level or spatial scale."""
    n = next(iter(arms.values()))[0].to_other.shape[0]
    seeds = len(arms[baseline])
    rng = np.random.default_rng(seed)
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(resamples)]

    def stats(idx):
        c = {a: [centres(shares(d, idx)) for d in ds] for a, ds in arms.items()}
        out = {"c": {a: np.mean(v, 0) for a, v in c.items()},
               "C": {a: [contrast(ci, fine, coarse) for ci in v] for a, v in c.items()},
               "rho": {a: spearman(lost_t, np.mean(v, 0)) for a, v in c.items()}}
        if crossover is not None:
            e, l = crossover
            out["X"] = {a: float(np.mean([ci[l] - ci[e] for ci in v])) for a, v in c.items()}
        return out

    point, boot = stats(draws[0]), [stats(i) for i in draws[1:]]
    res = {"n_images": n, "seeds": seeds, "resamples": resamples, "level": LEVEL,
           "fine": fine, "coarse": coarse, "lost_t": [float(x) for x in lost_t],
           "centres": {a: point["c"][a].tolist() for a in arms},
           "shares": {a: [shares(d).tolist() for d in ds] for a, ds in arms.items()},
           "contrast": {a: {"per_seed": point["C"][a], "pooled": float(np.mean(point["C"][a]))} for a in arms},
           "spearman": {a: {"point": point["rho"][a], "ci": _interval(np.array([b["rho"][a] for b in boot]))}
                        for a in arms},
           "I": {}}
    for a in diti_arms:
        per_seed = [point["C"][a][k] - point["C"][baseline][k] for k in range(seeds)]
        bs = np.array([[b["C"][a][k] - b["C"][baseline][k] for k in range(seeds)] for b in boot])
        res["I"][a] = {"per_seed": [{"point": float(per_seed[k]), "ci": _interval(bs[:, k])} for k in range(seeds)],
                       "pooled": {"point": float(np.mean(per_seed)), "ci": _interval(bs.mean(1))}}
        if crossover is not None:
            xs = np.array([b["X"][a] - b["X"][baseline] for b in boot])
            res.setdefault("crossover", {})[a] = {
                "point": point["X"][a] - point["X"][baseline], "ci": _interval(xs),
                "meaning": "c(late-lost fine-scale factor) − c(early-lost coarse-scale factor), DiTi − PDAE: "
                           "> 0 the order follows noise level, < 0 spatial scale"}
    return res


def decide(res: dict, arm: str, gates: dict, baseline: str = "pdae") -> dict:
    """The verdict for DiTi arm ``arm`` under the rule in the module docstring."""
    failed = [k for k, g in gates.items() if not g["pass"]]
    i = res["I"][arm]
    rho_d, rho_b = res["spearman"][arm]["ci"], res["spearman"][baseline]["ci"]
    checks = {
        "every seed's I interval above 0": all(s["ci"][0] > 0 for s in i["per_seed"]),
        "pooled I interval above 0": i["pooled"]["ci"][0] > 0,
        f"pooled I >= {MIN_EFFECT}": i["pooled"]["point"] >= MIN_EFFECT,
        f"{arm} Spearman interval above 0": rho_d[0] > 0,
        f"{baseline} Spearman interval contains 0": rho_b[0] <= 0 <= rho_b[1],
    }
    if failed:
        verdict, why = "inconclusive", f"gate(s) failed: {', '.join(failed)}"
    elif all(checks.values()):
        verdict, why = "reproduced", "every condition of the rule holds"
    elif i["pooled"]["ci"][1] < MIN_EFFECT:
        verdict, why = "not reproduced", f"pooled I upper bound {i['pooled']['ci'][1]:.3f} < {MIN_EFFECT}"
    else:
        verdict, why = "inconclusive", "gates pass, but neither the reproduced conditions nor the not-reproduced bound hold"
    return {"arm": arm, "verdict": verdict, "why": why, "checks": checks, "gates_failed": failed}


def order_follows(res: dict, arm: str) -> str:
    x = res.get("crossover", {}).get(arm)
    if x is None:
        return "unknown"
    lo, hi = x["ci"]
    if lo > 0:
        return "noise level"
    if hi < 0:
        return "spatial scale"
    return "undetermined (interval contains 0)"
