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
    """Three strided convolutions, global average pooling, one linear head per judged attribute."""

    def __init__(self, classes: dict[str, int]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(64, n) for k, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x).mean((2, 3))
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


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
