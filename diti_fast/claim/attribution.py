"""Per-chunk attribution with intervals: probes per chunk group and seed, bootstrap over test samples.

For one encoder (DiTi or PDAE) and every chunk group g (DiTi's stages), linear probes are trained on the
group's dims alone, on the prefix z[:hi_g] and on as many random dims (the control), once per probe
seed. Their raw test outputs are kept; the bootstrap resamples the test samples (the same resample for
every group, attribute and seed, so differences between them are paired) and recomputes each skill with
vectorised formulas (:func:`skills`), which tests check against the evaluation package's scikit-learn
metrics. From each resample's prefix-skill matrix come:

* the *onset* of an attribute: the first group (1-based) whose prefix reaches 90% of the attribute's
  best prefix skill; an attribute whose best skill is below ``min_skill`` never becomes decodable and
  counts as onset G + 1 (said in the output);
* the *early-decodability* of an attribute: the mean over groups of prefix skill / best prefix skill,
  a continuous version of the onset (1 = all of it in the first group's prefix, 1/G = only in the last);
* per tag (fine / coarse) their means, and the paired differences coarse − fine (onset) and
  fine − coarse (early-decodability): positive = fine attributes earlier, DiTi's claim.

Intervals are percentile intervals over resamples × seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..eval.chunks import ChunkGroup
from ..eval.probe import AttributeSpec, ProbeConfig, attribute_metrics, train_probe

MODES = ("alone", "prefix", "random")


def skills(scores: np.ndarray, y: np.ndarray, spec_kind: str, idx: np.ndarray) -> np.ndarray:
    """Skill of one attribute on each resample. ``scores``: the probe's raw outputs for the attribute on
    the test split ([n] or [n, classes]); ``y``: its labels [n]; ``idx``: resamples [B, n] of test rows.

    categorical: (accuracy − majority rate) / (1 − majority rate), both on the resample;
    continuous: max(Pearson r, 0) (r is invariant to the probe's standardisation of the target);
    binary: (AP − base rate) / (1 − base rate), through scikit-learn per resample (slow, not vectorised)."""
    if spec_kind == "categorical":
        yt = np.rint(y).astype(np.int64)
        correct = (scores.argmax(1) == yt).astype(np.float64)
        acc = correct[idx].mean(1)
        onehot = np.eye(scores.shape[1])[yt]
        majority = onehot[idx].mean(1).max(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(majority < 1, (acc - majority) / (1 - majority), np.nan)
    if spec_kind == "continuous":
        u, v = y.astype(np.float64)[idx], scores.astype(np.float64)[idx]
        u = u - u.mean(1, keepdims=True)
        v = v - v.mean(1, keepdims=True)
        den = np.sqrt((u * u).sum(1) * (v * v).sum(1))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(den > 0, (u * v).sum(1) / den, np.nan)
        return np.where(np.isnan(r), np.nan, np.maximum(r, 0.0))
    if spec_kind == "binary":
        spec = AttributeSpec("a", "binary")
        return np.array([attribute_metrics(scores[i][:, None], y[i][:, None], [spec])[0]["skill"] for i in idx])
    raise ValueError(f"unknown attribute kind {spec_kind!r}")


def _columns(specs: list[AttributeSpec]) -> list[slice]:
    out, o = [], 0
    for s in specs:
        w = s.width
        out.append(slice(o, o + w) if s.kind == "categorical" else o)
        o += w
    return out


@dataclass
class ProbeRuns:
    """Raw test outputs of every probe: scores[seed][mode][group] = array [n_test, outputs]."""
    specs: list[AttributeSpec]
    groups: list[ChunkGroup]
    seeds: list[int]
    test_y: np.ndarray
    scores: dict
    point: dict  # point[seed][mode][group] = per-attribute test metrics (the evaluation package's)


def run_probes(train, val, test, specs: list[AttributeSpec], groups: list[ChunkGroup], seeds, cfg: ProbeConfig,
               log=print) -> ProbeRuns:
    """``train``/``val``/``test``: (z, attrs) pairs. Probes on alone / prefix / random dims per group and seed."""
    D = train[0].shape[1]
    scores, point = {}, {}
    for seed in seeds:
        c = ProbeConfig(**{**cfg.__dict__, "seed": int(seed)})
        rng = np.random.default_rng(seed)
        scores[seed] = {m: [] for m in MODES}
        point[seed] = {m: [] for m in MODES}
        for g in groups:
            dims = {"alone": slice(g.dim_lo, g.dim_hi), "prefix": slice(0, g.dim_hi),
                    "random": np.sort(rng.choice(D, g.dim_hi - g.dim_lo, replace=False))}
            for m in MODES:
                r = train_probe(train, val, test, specs, c, dims=dims[m])
                scores[seed][m].append(r.test_scores)
                point[seed][m].append(r.test)
            mean = np.nanmean([a["skill"] for a in point[seed]["prefix"][-1]])
            log(f"    seed {seed} {g.name}: prefix mean skill {mean:.3f}")
    return ProbeRuns(specs, groups, list(seeds), test[1], scores, point)


def bootstrap_skills(runs: ProbeRuns, n_boot: int, seed: int = 0) -> np.ndarray:
    """Skill array [seed, resample, mode, attribute, group]; resample 0 is the test split itself."""
    n = len(runs.test_y)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(n)[None], rng.integers(0, n, (max(n_boot, 1), n))])
    cols = _columns(runs.specs)
    out = np.empty((len(runs.seeds), len(idx), len(MODES), len(runs.specs), len(runs.groups)))
    for si, s in enumerate(runs.seeds):
        for mi, m in enumerate(MODES):
            for gi in range(len(runs.groups)):
                sc = runs.scores[s][m][gi]
                for ai, spec in enumerate(runs.specs):
                    out[si, :, mi, ai, gi] = skills(sc[:, cols[ai]], runs.test_y[:, ai], spec.kind, idx)
    return out


def onsets(prefix: np.ndarray, frac: float = 0.9, min_skill: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``prefix``: skills [..., attribute, group] -> (onset group 1-based [..., attribute], early-decodability
    [..., attribute]). Never decodable (best < min_skill): onset G + 1, early-decodability NaN."""
    G = prefix.shape[-1]
    p = np.nan_to_num(prefix, nan=0.0)
    best = p.max(-1, keepdims=True)
    ok = best[..., 0] >= min_skill
    reached = p >= frac * best
    onset = np.where(ok, reached.argmax(-1) + 1, G + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        early = np.where(ok, (np.clip(p, 0, None) / np.where(best > 0, best, 1)).mean(-1), np.nan)
    return onset.astype(np.float64), early


def interval(x: np.ndarray, level: float = 0.95) -> dict:
    x = np.asarray(x, np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    a = (1 - level) / 2
    return {"mean": float(x.mean()), "lo": float(np.quantile(x, a)), "hi": float(np.quantile(x, 1 - a)), "n": len(x)}


def summarise(runs: ProbeRuns, boot: np.ndarray, frac: float = 0.9, min_skill: float = 0.1) -> dict:
    """Everything the report states about one encoder, with intervals over resamples × seeds."""
    specs = runs.specs
    pre = boot[:, :, MODES.index("prefix")]                    # [S, B, A, G]
    onset, early = onsets(pre, frac, min_skill)                # [S, B, A]
    point_onset, point_early = onsets(pre[:, 0], frac, min_skill)  # the test split itself, per seed
    tags = {t: [i for i, s in enumerate(specs) if s.group == t] for t in ("fine", "coarse")}
    per_attr = []
    for i, s in enumerate(specs):
        per_attr.append({
            "name": s.name, "tag": s.group, "metric": s.metric,
            "onset_group": interval(onset[:, 1:, i]), "onset_group_point": point_onset[:, i].tolist(),
            "never_decodable_seeds": int((point_onset[:, i] > len(runs.groups)).sum()),
            "early_decodability": interval(early[:, 1:, i]),
            "skill": {m: [interval(boot[:, 1:, mi, i, g]) for g in range(len(runs.groups))]
                      for mi, m in enumerate(MODES)},
        })
    out = {"attributes": per_attr, "groups": [g.label for g in runs.groups], "seeds": runs.seeds,
           "n_test": int(len(runs.test_y)), "n_boot": int(boot.shape[1] - 1), "onset_fraction": frac,
           "min_skill": min_skill}
    if tags["fine"] and tags["coarse"]:
        f_on, c_on = onset[:, 1:, tags["fine"]].mean(-1), onset[:, 1:, tags["coarse"]].mean(-1)
        f_ea, c_ea = np.nanmean(early[:, 1:, tags["fine"]], -1), np.nanmean(early[:, 1:, tags["coarse"]], -1)
        d_on, d_ea = c_on - f_on, f_ea - c_ea
        out["fine_vs_coarse"] = {
            "fine_mean_onset": interval(f_on), "coarse_mean_onset": interval(c_on),
            "onset_difference_coarse_minus_fine": interval(d_on),
            "fine_mean_early_decodability": interval(f_ea), "coarse_mean_early_decodability": interval(c_ea),
            "early_difference_fine_minus_coarse": interval(d_ea),
            "verdict_onset": verdict(interval(d_on)), "verdict_early": verdict(interval(d_ea)),
        }
    return out


def verdict(iv: dict) -> str:
    """Reading of a 'positive = fine earlier' difference interval."""
    if iv["mean"] is None:
        return "undefined"
    if iv["lo"] > 0:
        return "fine earlier"
    if iv["hi"] < 0:
        return "coarse earlier"
    return "no significant order"


def survival_t(delta_norm: float, alphas_cumprod: np.ndarray) -> int:
    """First time-step at which a Bayes-optimal detector loses a factor whose image change has L2 norm
    ``delta_norm`` (model units): the detection SNR sqrt(ᾱ_t / (1 − ᾱ_t)) · ‖Δ‖ falls below 1."""
    a = np.asarray(alphas_cumprod, np.float64)
    snr = np.sqrt(a / np.clip(1 - a, 1e-300, None)) * float(delta_norm)
    below = np.nonzero(snr < 1)[0]
    return int(below[0]) if len(below) else len(a)


def finite_tree(o) -> bool:
    """True when every float in a nested JSON-like object is finite or None."""
    if isinstance(o, dict):
        return all(finite_tree(v) for v in o.values())
    if isinstance(o, (list, tuple)):
        return all(finite_tree(v) for v in o)
    if isinstance(o, float):
        return math.isfinite(o)
    return True
