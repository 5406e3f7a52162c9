"""Are the DDPM's samples recognisable? A small CNN trained on real images judges them.

Generated samples carry no labels, so the judge cannot score accuracy on them. What it can say: on a
real held-out image it names colour and shape with high confidence; on noise or a smear it does not.
The number recorded is the *confident fraction*: samples whose colour AND shape predictions both have
probability >= ``threshold``, next to the same fraction on real held-out images (the ceiling) and the
judge's accuracy there (so a weak judge shows). The predicted-class histograms show whether the
samples cover every colour and shape or collapse onto a few.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("colour", "shape")


class Judge(nn.Module):
    """Four convolutions (three strided), global max pooling, one linear head per judged attribute."""

    def __init__(self, classes: dict[str, int]):
        super().__init__()
        # No batch norm: real and junk batches go through separately, and statistics mixed from the
        # two would not match either at evaluation.
        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1), nn.ReLU()]
        self.body = nn.Sequential(*block(3, 32, 2), *block(32, 64, 1), *block(64, 64, 2), *block(64, 128, 2))
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Max-pooling keeps "there is a corner / an apex somewhere", which averaging would dilute.
        h = self.body(x).amax((2, 3))
        return {k: head(h) for k, head in self.heads.items()}


def train_judge(x: torch.Tensor, labels: dict[str, np.ndarray], classes: dict[str, int], epochs: int = 4,
                batch: int = 64, lr: float = 2e-3, seed: int = 0) -> Judge:
    """``x``: real images in model space [-1, 1]; ``labels``: class ids per head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(classes)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    ys = {k: torch.as_tensor(v, dtype=torch.long) for k, v in labels.items()}
    g = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            out = judge(x[idx])
            loss = sum(F.cross_entropy(out[k], ys[k][idx]) for k in classes)
            # Outlier exposure: a classifier trained on real images alone is confidently wrong on
            # noise (measured: 59% of Gaussian-noise images got >= 0.9 on both heads), which would
            # pass an untrained DDPM. Pushing its outputs on junk towards uniform fixes that.
            junk = outliers(x[idx], g)
            out_j = judge(junk)
            loss = loss + sum(-F.log_softmax(out_j[k], 1).mean() for k in classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


def outliers(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Junk the size of ``x``: a third Gaussian noise (random scale), a third the real images buried in
    noise (what a DDPM sample looks like early in training), a third the real images smeared to 4x4 blocks."""
    n = len(x)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 0.9 + 0.3
    noise = torch.randn(x.shape, generator=g) * scale
    buried = 0.35 * x + noise
    smeared = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest") + 0.1 * noise
    which = torch.randint(0, 3, (n, 1, 1, 1), generator=g)
    return torch.where(which == 0, noise, torch.where(which == 1, buried, smeared)).clamp(-1, 1)


@torch.no_grad()
def judge_images(judge: Judge, x: torch.Tensor, threshold: float = 0.9) -> dict:
    """Per head: predicted class, its probability, the class histogram; and the confident fraction."""
    probs = {k: torch.cat([F.softmax(judge(x[i:i + 256])[k], 1) for i in range(0, len(x), 256)])
             for k in judge.heads}
    out: dict = {"n": len(x), "threshold": threshold}
    confident = torch.ones(len(x), dtype=torch.bool)
    for k, p in probs.items():
        conf, pred = p.max(1)
        confident &= conf >= threshold
        out[k] = {"pred": pred.tolist(), "mean_confidence": float(conf.mean()),
                  "histogram": torch.bincount(pred, minlength=p.shape[1]).tolist()}
    out["confident_fraction"] = float(confident.float().mean())
    return out


def accuracy(result: dict, labels: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(np.asarray(result[k]["pred"]) == np.asarray(v))) for k, v in labels.items()}
