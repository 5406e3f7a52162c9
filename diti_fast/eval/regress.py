"""The original's attribute-regression protocol (eval/attribute_regression.py, LFW attributes).

One ``Linear(D -> A)`` on frozen encoder features, trained with MSE on the *raw* targets (not
standardised, unlike the probe's continuous attributes), Adam lr 1e-3, batch 64 shuffled, 15 epochs;
after every epoch the test split's per-attribute Pearson r and MSE are measured (the original writes
every epoch's numbers to test.txt and marks the epoch with the best mean r). Images are expected
preprocessed as the original's: ``data_shards make --crop resize-center`` (Resize(70) then
CenterCrop(64) for 64 px; LFW has 73 continuous attributes).

Pearson r is SciPy's, MSE scikit-learn's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import EvalError, FeatureSet
from .probe import AttributeSpec, attribute_metrics


@dataclass
class RegressConfig:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise EvalError("regression: --epochs and --batch-size must be >= 1 and --lr > 0")


def continuous_columns(attributes: list[dict], names: list[str] | None) -> list[int]:
    """Indices of the requested continuous attributes (all continuous ones by default)."""
    all_names = [a["name"] for a in attributes]
    if names:
        unknown = [n for n in names if n not in all_names]
        if unknown:
            raise EvalError(f"attribute(s) {', '.join(unknown)} not in the manifest; it has {', '.join(all_names)}")
        bad = [n for n in names if attributes[all_names.index(n)].get("kind") != "continuous"]
        if bad:
            raise EvalError(f"regression needs continuous attributes; {', '.join(bad)} are not")
        return [all_names.index(n) for n in names]
    cols = [i for i, a in enumerate(attributes) if a.get("kind") == "continuous"]
    if not cols:
        raise EvalError("the data's manifest has no continuous attribute to regress (kinds: "
                        + ", ".join(f"{a['name']}:{a.get('kind')}" for a in attributes) + ")")
    return cols


@dataclass
class RegressResult:
    config: dict
    attributes: list[str]
    epochs: list[dict]        # per epoch: mean_pearson_r, mean_mse, per-attribute r and mse
    best_epoch: int           # by mean test Pearson r, as the original marks it
    n_train: int
    n_test: int

    @property
    def final(self) -> dict:
        return self.epochs[-1]

    def to_json(self) -> dict:
        return asdict(self)


def regress(train: FeatureSet, test: FeatureSet, cfg: RegressConfig | None = None,
            names: list[str] | None = None) -> RegressResult:
    cfg = cfg or RegressConfig()
    cfg.validate()
    cols = continuous_columns(train.attributes, names)
    specs = [AttributeSpec(train.attributes[i]["name"], "continuous") for i in cols]
    x_tr, y_tr = torch.from_numpy(train.z.astype(np.float32)), torch.from_numpy(train.attrs[:, cols].astype(np.float32))
    x_te, y_te = torch.from_numpy(test.z.astype(np.float32)), test.attrs[:, cols].astype(np.float64)
    if len(x_tr) == 0 or len(x_te) == 0:
        raise EvalError(f"regression needs train and test samples, got {len(x_tr)} and {len(x_te)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = nn.Linear(x_tr.shape[1], len(cols))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.mse_loss(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = model(x_te).double().numpy()
        m = attribute_metrics(pred, y_te, specs, coder=None, full=True)
        rs = [x["pearson_r"] for x in m]
        mses = [x["mse"] for x in m]
        history.append({"mean_pearson_r": _nanmean(rs), "mean_mse": _nanmean(mses), "pearson_r": rs, "mse": mses})
    scores = [h["mean_pearson_r"] for h in history]
    best = int(np.nanargmax(scores)) if not all(math.isnan(s) for s in scores) else len(history) - 1
    return RegressResult(asdict(cfg), [s.name for s in specs], history, best, len(x_tr), len(x_te))


def _nanmean(v) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def format_regress_table(res: RegressResult) -> str:
    f, b = res.final, res.epochs[res.best_epoch]
    lines = [f"| attribute | Pearson r (epoch {len(res.epochs)}) | MSE (epoch {len(res.epochs)}) |", "|---|---|---|"]
    lines += [f"| {n} | {r:.3f} | {m:.4g} |" for n, r, m in zip(res.attributes, f["pearson_r"], f["mse"])]
    lines += ["", f"final epoch: mean Pearson r {f['mean_pearson_r']:.4f}, mean MSE {f['mean_mse']:.4g} · "
              f"best epoch {res.best_epoch + 1}: mean r {b['mean_pearson_r']:.4f} · train/test {res.n_train}/{res.n_test}"]
    return "\n".join(lines)


__all__ = ["RegressConfig", "RegressResult", "regress", "format_regress_table", "continuous_columns"]
