"""The claim run (diti_fast.claim): its statistics against independent references, and the smoke plan
end to end (every phase, tiny sizes) with its outputs, numbers and resumption checked."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diti_fast.claim import attribution as A
from diti_fast.eval.probe import AttributeSpec, attribute_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_vectorised_skills_match_the_evaluation_metrics():
    """The bootstrap's vectorised skills equal the evaluation package's scikit-learn/SciPy metrics."""
    rng = np.random.default_rng(0)
    n = 300
    y_cat = rng.integers(0, 4, n).astype(np.float32)
    logits = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[y_cat.astype(int)] * (rng.random(n) < 0.6)[:, None]
    y_con = rng.normal(size=n).astype(np.float32)
    pred = (0.7 * y_con + rng.normal(size=n)).astype(np.float32)
    specs = [AttributeSpec("c", "categorical", 4), AttributeSpec("r", "continuous")]
    for idx in (np.arange(n), rng.integers(0, n, n)):
        ref = attribute_metrics(np.concatenate([logits, pred[:, None]], 1)[idx],
                                np.stack([y_cat, y_con], 1)[idx], specs)
        got_c = A.skills(logits, y_cat, "categorical", idx[None])[0]
        got_r = A.skills(pred, y_con, "continuous", idx[None])[0]
        assert got_c == pytest.approx(ref[0]["skill"], abs=1e-12)
        assert got_r == pytest.approx(ref[1]["skill"], abs=1e-9)
    # Anti-correlated predictions have skill 0 (max(r, 0)), as in the evaluation package.
    assert A.skills(-y_con, y_con, "continuous", np.arange(n)[None])[0] == 0.0


def test_onsets_on_a_hand_made_matrix():
    pre = np.array([[0.05, 0.5, 0.95, 1.0, 1.0],     # reaches 0.9 x 1.0 at stage 3
                    [0.9, 0.95, 1.0, 1.0, 0.98],    # at stage 1
                    [0.0, 0.02, 0.05, 0.04, 0.01],  # best 0.05 < 0.1: never -> 6
                    [0.2, 0.2, 0.2, 0.2, 0.4]])     # at stage 5; early = mean(0.5,0.5,0.5,0.5,1)
    onset, early = A.onsets(pre)
    assert onset.tolist() == [3, 1, 6, 5]
    assert early[0] == pytest.approx((0.05 + 0.5 + 0.95 + 1 + 1) / 5)
    assert math.isnan(early[2]) and early[3] == pytest.approx(0.6)


def test_survival_t_against_the_closed_form():
    """Linear betas 1e-4..0.02 over 1000 steps (float64 here, independently of the schedule code)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1 - betas)
    for delta in (0.3, 1.0, 3.0, 10.0):
        t = A.survival_t(delta, ac)
        assert ac[t] / (1 - ac[t]) * delta ** 2 < 1 <= ac[t - 1] / (1 - ac[t - 1]) * delta ** 2
    assert A.survival_t(1e6, ac) == 1000  # never lost within the schedule


def test_verdicts_and_intervals():
    assert A.verdict({"mean": 1.0, "lo": 0.2, "hi": 2.0}) == "fine earlier"
    assert A.verdict({"mean": -1.0, "lo": -2.0, "hi": -0.1}) == "coarse earlier"
    assert A.verdict({"mean": 0.1, "lo": -0.5, "hi": 0.7}) == "no significant order"
    iv = A.interval(np.r_[np.arange(1000.0), np.nan])
    assert iv["n"] == 1000 and iv["lo"] == pytest.approx(24.975) and iv["hi"] == pytest.approx(974.025)


def test_the_judge_rejects_junk():
    """Outlier exposure: trained on a few real images, the judge is not confident on noise."""
    from data_shards.synthetic_clear import render
    from diti_fast.claim import judge as J
    torch.manual_seed(0)
    imgs, attrs = render(range(400), 32, seed=0)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    lab = {"colour": attrs[:, 1].astype(int), "shape": attrs[:, 0].astype(int)}
    judge = J.train_judge(x[:320], {k: v[:320] for k, v in lab.items()}, {"colour": 6, "shape": 3}, epochs=2)
    real = J.judge_images(judge, x[320:])
    assert J.accuracy(real, {k: v[320:] for k, v in lab.items()})["colour"] > 0.5  # chance 1/6
    noise = J.judge_images(judge, torch.randn(100, 3, 32, 32).clamp(-1, 1))
    assert noise["confident_fraction"] <= 0.05


PHASES = ("shards", "ddpm", "diti", "pdae", "attribution_diti", "attribution_pdae", "grids_diti", "grids_pdae",
          "report", "total")
PNGS = ("onset_curves.png", "fine_vs_coarse.png", "losses.png", "ddpm_samples.png", "counterfactuals_diti.png",
        "counterfactuals_pdae.png")


def _run(work: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "diti_fast.claim", "--smoke", "--threads", "1", "--work", str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_claim_runs_end_to_end_and_resumes(tmp_path):
    work = tmp_path / "claim"
    p = _run(work)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = work / "results"
    result = json.loads((res / "claim.json").read_text())
    assert result["command"].startswith("python -m diti_fast.claim --smoke")
    assert len(result["git"]["commit"]) == 40 and result["plan"]["name"] == "smoke"
    assert set(PHASES) <= set(result["timings_s"]) and all(v >= 0 for v in result["timings_s"].values())
    assert A.finite_tree(result)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:  # the commit that ran (read at the start), not whatever HEAD is when the report is written
        assert result["git"]["commit"] == head
    for name in ("diti", "pdae"):
        # The loss drop the reading quotes: first vs last tenth of the run's own metrics records.
        losses = [json.loads(line)["loss"] for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        k = max(1, len(losses) // 10)
        enc = result["encoders"][name]
        assert enc["loss_first_tenth"] == pytest.approx(np.mean(losses[:k]))
        assert enc["loss_drop_fraction"] == pytest.approx(1 - np.mean(losses[-k:]) / np.mean(losses[:k]))
        fc = result["attribution"][name]["fine_vs_coarse"]
        for key in ("fine_mean_onset", "coarse_mean_onset", "onset_difference_coarse_minus_fine"):
            iv = fc[key]
            assert iv["lo"] <= iv["mean"] <= iv["hi"] and iv["n"] == 2 * result["plan"]["bootstrap"]
        assert fc["verdict_onset"] in ("fine earlier", "coarse earlier", "no significant order")
        # The JSON's mean onsets are what the saved skill array gives (recomputed here by a plain loop).
        boot = np.load(work / "attribution" / f"{name}.skills.npy")
        tags = [a["tag"] for a in result["attribution"][name]["attributes"]]
        pre = np.nan_to_num(boot[:, 1:, 1], nan=0.0)  # mode 1 = prefix
        G = pre.shape[-1]
        fine = []
        for s in range(pre.shape[0]):
            for b in range(pre.shape[1]):
                on = []
                for a, tag in enumerate(tags):
                    row = pre[s, b, a]
                    best = row.max()
                    o = G + 1 if best < 0.1 else 1 + next(g for g in range(G) if row[g] >= 0.9 * best)
                    if tag == "fine":
                        on.append(o)
                fine.append(np.mean(on))
        assert fc["fine_mean_onset"]["mean"] == pytest.approx(np.mean(fine))
        assert set(result["grids"][name]["per_group"]) == {f"stage {i}" for i in range(1, G + 1)}
    assert result["ddpm"]["checks"] and result["data"]["factors"]["colour"]["delta_l2_median"] > 0
    assert result["reading"] and all(isinstance(s, str) and s for s in result["reading"])
    for png in PNGS:
        data = (res / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    assert "## Reading" in (res / "claim.md").read_text()

    # Resumption: the same command again finds every phase's outputs and trains nothing.
    ckpts = sorted(str(q) for q in work.rglob("step-*"))
    p2 = _run(work)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert "[diti-fast] stage=" not in p2.stdout and sorted(str(q) for q in work.rglob("step-*")) == ckpts
    again = json.loads((res / "claim.json").read_text())
    assert again["attribution"] == result["attribution"] and len(again["launches"]) == 2
