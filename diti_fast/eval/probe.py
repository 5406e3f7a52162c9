"""Linear probes on frozen features: the paper's protocol, extended to every attribute kind.

The original (eval/multitask_classification.py) trains one ``Linear(512 -> 40)`` on frozen EMA encoder
features with BCE-with-logits, Adam 1e-3, batch 128, 15 epochs, keeps the epoch with the best mean
validation AP and reports the mean test AP. Here one linear layer serves all attributes of a data set:

* binary: one logit, BCE-with-logits; reported as average precision (and the base rate it beats);
* categorical: ``num_classes`` logits, cross-entropy; reported as accuracy (and the majority rate);
* continuous: one output, MSE on the target standardised with training statistics (so its loss is on
  the same scale as the others); reported as MSE in the data's own units and Pearson r.

The training loss is the mean of the per-attribute losses, so with binary attributes only it equals the
original's ``BCEWithLogits`` mean over batch x attributes. Model selection uses the mean validation
*score* (AP / accuracy / Pearson r): the original's mean validation AP when every attribute is binary.
Every metric is computed by scikit-learn (Pearson r by SciPy), never by hand.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, average_precision_score, log_loss, mean_squared_error, r2_score

KINDS = ("binary", "categorical", "continuous")


@dataclass
class AttributeSpec:
    name: str
    kind: str
    num_classes: int | None = None
    group: str | None = None  # e.g. "fine" / "coarse" in the synthetic manifest

    @property
    def width(self) -> int:
        """Number of probe outputs this attribute owns."""
        return int(self.num_classes) if self.kind == "categorical" else 1

    @property
    def metric(self) -> str:
        return {"binary": "ap", "categorical": "accuracy", "continuous": "pearson_r"}[self.kind]


def specs_from_manifest(attributes: list[dict]) -> list[AttributeSpec]:
    specs = []
    for a in attributes:
        if a.get("kind") not in KINDS:
            raise ValueError(f"attribute {a.get('name')!r}: kind {a.get('kind')!r} is not one of {KINDS}")
        if a["kind"] == "categorical" and not a.get("num_classes"):
            raise ValueError(f"attribute {a['name']!r} is categorical but has no num_classes")
        specs.append(AttributeSpec(a["name"], a["kind"], a.get("num_classes"), a.get("group")))
    return specs


@dataclass
class ProbeConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    # The original feeds raw features. Standardising them (train mean/std) leaves the family of linear
    # probes unchanged but makes Adam's fixed step size independent of the encoder's output scale, which
    # matters for short runs and for small chunk groups; off by default to keep the paper's protocol.
    standardize: bool = False
    device: str = "cpu"


def _offsets(specs: list[AttributeSpec]) -> list[tuple[int, int]]:
    out, o = [], 0
    for s in specs:
        out.append((o, o + s.width))
        o += s.width
    return out


class TargetCoder:
    """Float attribute table [N, A] -> per-kind training targets; inverse map for continuous outputs."""

    def __init__(self, specs: list[AttributeSpec], train_y: np.ndarray):
        self.specs = specs
        cont = [i for i, s in enumerate(specs) if s.kind == "continuous"]
        self.mean = np.zeros(len(specs), np.float64)
        self.std = np.ones(len(specs), np.float64)
        if cont:
            self.mean[cont] = train_y[:, cont].mean(0)
            sd = train_y[:, cont].std(0)
            self.std[cont] = np.where(sd > 0, sd, 1.0)

    def encode(self, y: np.ndarray) -> torch.Tensor:
        """Binary -> {0,1} (anything > 0 is positive, so -1/1 tables work too); categorical -> class id;
        continuous -> standardised value."""
        out = np.empty_like(y, dtype=np.float32)
        for i, s in enumerate(self.specs):
            col = y[:, i]
            if s.kind == "binary":
                out[:, i] = (col > 0).astype(np.float32)
            elif s.kind == "categorical":
                out[:, i] = np.rint(col)
            else:
                out[:, i] = (col - self.mean[i]) / self.std[i]
        return torch.from_numpy(out)

    def continuous_to_units(self, i: int, pred: np.ndarray) -> np.ndarray:
        return pred * self.std[i] + self.mean[i]


def probe_loss(out: torch.Tensor, target: torch.Tensor, specs: list[AttributeSpec]) -> torch.Tensor:
    losses = []
    for i, ((a, b), s) in enumerate(zip(_offsets(specs), specs)):
        if s.kind == "binary":
            losses.append(F.binary_cross_entropy_with_logits(out[:, a], target[:, i]))
        elif s.kind == "categorical":
            losses.append(F.cross_entropy(out[:, a:b], target[:, i].long()))
        else:
            losses.append(F.mse_loss(out[:, a], target[:, i]))
    return torch.stack(losses).mean()


def _safe(fn, *args, **kw) -> float:
    """A metric that is undefined on this split (one class only, constant input) is NaN, not a crash."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn(*args, **kw))
        except ValueError:
            return math.nan
    return v if math.isfinite(v) else math.nan


def attribute_metrics(scores: np.ndarray, y: np.ndarray, specs: list[AttributeSpec],
                      coder: TargetCoder | None = None, full: bool = True) -> list[dict]:
    """Per-attribute metrics of raw probe outputs ``scores`` [N, sum(width)] against the table ``y`` [N, A].

    Each dict has ``score`` (AP / accuracy / Pearson r: what model selection averages) and ``skill``:
    the score rescaled so that chance is 0 and perfect is 1 — (AP - base rate) / (1 - base rate),
    (accuracy - majority rate) / (1 - majority rate), max(r, 0) — comparable across kinds for heatmaps.
    ``full=False`` skips what model selection does not read (cross-entropy, MSE, R²): it runs every epoch.
    """
    out = []
    for i, ((a, b), s) in enumerate(zip(_offsets(specs), specs)):
        col = y[:, i]
        m: dict = {"name": s.name, "kind": s.kind, "metric": s.metric}
        if s.kind == "binary":
            yt = (col > 0).astype(np.int64)
            base = float(yt.mean()) if len(yt) else math.nan
            # AP only ranks the scores, so logits serve as well as probabilities.
            ap = _safe(average_precision_score, yt, scores[:, a]) if 0 < yt.sum() < len(yt) else math.nan
            m.update(ap=ap, base_rate=base, score=ap,
                     skill=(ap - base) / (1 - base) if not math.isnan(ap) else math.nan)
        elif s.kind == "categorical":
            yt = np.rint(col).astype(np.int64)
            logits = scores[:, a:b]
            pred = logits.argmax(1)
            acc = _safe(accuracy_score, yt, pred)
            counts = np.bincount(yt, minlength=s.width)
            majority = float(counts.max() / counts.sum()) if counts.sum() else math.nan
            ce = math.nan
            if full:
                prob = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
                ce = _safe(log_loss, yt, prob, labels=list(range(s.width)))
            m.update(accuracy=acc, majority_rate=majority, cross_entropy=ce, score=acc,
                     skill=(acc - majority) / (1 - majority) if majority < 1 else math.nan)
        else:
            pred = scores[:, a].astype(np.float64)
            if coder is not None:
                pred = coder.continuous_to_units(i, pred)
            r = _safe(lambda u, v: pearsonr(u, v).statistic, col.astype(np.float64), pred) \
                if np.ptp(col) > 0 and np.ptp(pred) > 0 else math.nan
            m.update(pearson_r=r, mse=_safe(mean_squared_error, col, pred) if full else math.nan,
                     r2=_safe(r2_score, col, pred) if full else math.nan,
                     score=r, skill=max(r, 0.0) if not math.isnan(r) else math.nan)
        out.append(m)
    return out


def mean_of(metrics: list[dict], key: str, kinds=KINDS) -> float:
    vals = [m[key] for m in metrics if m["kind"] in kinds and not math.isnan(m.get(key, math.nan))]
    return float(np.mean(vals)) if vals else math.nan


def summarize(metrics: list[dict]) -> dict:
    return {"mean_score": mean_of(metrics, "score"), "mean_skill": mean_of(metrics, "skill"),
            "mean_ap": mean_of(metrics, "ap", ("binary",)),
            "mean_accuracy": mean_of(metrics, "accuracy", ("categorical",)),
            "mean_pearson_r": mean_of(metrics, "pearson_r", ("continuous",))}


@dataclass
class ProbeResult:
    config: dict
    specs: list[AttributeSpec]
    best_epoch: int
    val_history: list[float]          # mean validation score per epoch
    test: list[dict]                  # per-attribute metrics on the test split
    summary: dict                     # means over attributes (mean_ap is the paper's number)
    n_train: int
    n_val: int
    n_test: int
    test_scores: np.ndarray = field(repr=False, default=None)  # raw outputs on the test split

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("test_scores", "specs")}
        d["attributes"] = [asdict(s) for s in self.specs]
        return d


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """A probe step is a [128 x D] @ [D x ~30] matmul: on CPU, intra-op threading costs more than it
    saves (3-10x slower with 2 threads on a busy machine), so train probes single-threaded."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, bs: int = 4096) -> np.ndarray:
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)]).cpu().numpy()


def train_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], specs: list[AttributeSpec],
                cfg: ProbeConfig | None = None, dims: slice | np.ndarray | None = None) -> ProbeResult:
    """Train one linear probe on (features, attribute table) pairs; ``dims`` (a slice or an index array)
    restricts the features to a chunk group or a prefix of z. Selects the epoch with the best mean
    validation score."""
    cfg = cfg or ProbeConfig()
    with _single_thread(torch.device(cfg.device)):
        return _train_probe(train, val, test, specs, cfg, dims)


def _train_probe(train, val, test, specs, cfg: ProbeConfig, dims) -> ProbeResult:
    sel = dims if dims is not None else slice(None)
    xs = [np.ascontiguousarray(s[0][:, sel], dtype=np.float32) for s in (train, val, test)]
    if xs[0].shape[1] == 0:
        raise ValueError("the probe got zero feature dimensions")
    if cfg.standardize:
        mu, sd = xs[0].mean(0), xs[0].std(0)
        sd = np.where(sd > 0, sd, 1.0)
        xs = [(x - mu) / sd for x in xs]
    dev = torch.device(cfg.device)
    x_tr, x_va, x_te = (torch.from_numpy(x).to(dev) for x in xs)
    coder = TargetCoder(specs, train[1])
    y_tr = coder.encode(train[1]).to(dev)

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # seed the Linear's default init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = nn.Linear(x_tr.shape[1], sum(s.width for s in specs)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_epoch, best_state, history = -math.inf, -1, None, []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen).to(dev)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = probe_loss(model(x_tr[idx]), y_tr[idx], specs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        val_metrics = attribute_metrics(_outputs(model, x_va), val[1], specs, coder, full=False)
        val_score = summarize(val_metrics)["mean_score"]
        history.append(val_score)
        # NaN (e.g. a validation split with one class) never wins; the first epoch is kept as a fallback.
        if best_state is None or (not math.isnan(val_score) and val_score > best):
            best, best_epoch, best_state = (val_score if not math.isnan(val_score) else -math.inf,
                                            epoch, copy.deepcopy(model.state_dict()))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    scores = _outputs(model, x_te)
    metrics = attribute_metrics(scores, test[1], specs, coder)
    return ProbeResult(config=asdict(cfg), specs=specs, best_epoch=best_epoch, val_history=history,
                       test=metrics, summary=summarize(metrics), n_train=len(xs[0]), n_val=len(xs[1]),
                       n_test=len(xs[2]), test_scores=scores)


def format_probe_table(result: ProbeResult) -> str:
    """Markdown table of the per-attribute test metrics."""
    lines = ["| attribute | kind | metric | value | chance | extra |", "|---|---|---|---|---|---|"]
    for m in result.test:
        if m["kind"] == "binary":
            row = (m["ap"], m["base_rate"], "")
        elif m["kind"] == "categorical":
            row = (m["accuracy"], m["majority_rate"], f"CE {m['cross_entropy']:.3f}")
        else:
            row = (m["pearson_r"], 0.0, f"MSE {m['mse']:.4g}, R² {m['r2']:.3f}")
        lines.append(f"| {m['name']} | {m['kind']} | {m['metric']} | {row[0]:.3f} | {row[1]:.3f} | {row[2]} |")
    s = result.summary
    means = [f"{label} {s[key]:.4f}" for key, label in (("mean_ap", "mean AP (binary)"),
             ("mean_accuracy", "mean accuracy (categorical)"), ("mean_pearson_r", "mean Pearson r (continuous)"))
             if not math.isnan(s[key])]
    lines += ["", " · ".join(means + [f"best epoch {result.best_epoch + 1}/{result.config['epochs']}",
                                      f"train/val/test {result.n_train}/{result.n_val}/{result.n_test}"])]
    return "\n".join(lines)
