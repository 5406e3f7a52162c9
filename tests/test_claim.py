"""The claim experiment (diti_fast.claim): its data design, the exact Bayes computation, the stage-share
metric and decision rule on encoders whose answer is known, and the smoke plan end to end."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from data_shards import synthetic_staged as S
from diti_fast.claim import bayes, measure
from diti_fast.claim import stage_share as SS
from diti_fast.eval.features import iter_batches

ROOT = Path(__file__).resolve().parents[1]
DIMS = (8, 8, 16)
NAMES = S.NAMES
FINE = [NAMES.index(n) for n in ("brightness", "texture", "dot")]
MIDDLE = [NAMES.index("mark")]
COARSE = [NAMES.index(n) for n in ("background", "colour", "position", "stripes")]
# Stage-level stand-in for the Bayes lost t (the rule only uses its ranks).
LOST_T = np.array([{1: 125.0, 2: 375.0, 3: 750.0}[a["designed_stage"]] + i for i, a in enumerate(S.ATTRIBUTES)])


# ----------------------------------------------------------------------------------------- data

def test_each_factor_changes_only_its_own_pixels_by_its_designed_amount():
    rng = np.random.default_rng(0)
    v = S.draw_values(0, np.arange(64))
    base = S.render_values(v)
    assert base.min() >= 0 and base.max() <= 255  # no clipping: factors do not interact through it
    for f, name in enumerate(NAMES):
        other = S.redraw(v, f, rng)
        assert (other[:, f] != v[:, f]).all() and (np.delete(other, f, 1) == np.delete(v, f, 1)).all()
        diff = S.render_values(other) - base
        changed = (np.abs(diff) > 0).any(-1).sum((1, 2))
        if name == "brightness":   # every pixel, by exactly 3 grey levels
            assert (changed == 256).all() and np.allclose(np.abs(diff), 3.0)
        if name == "dot":          # two pixels: the old place loses 32, the new one gains 32
            assert (changed == 2).all() and np.allclose(np.sort(np.abs(diff).max((1, 2, 3))), 32.0)
        if name == "mark":         # two 2x2 corners of the square
            assert (changed == 8).all() and np.isclose(np.abs(diff).max(), 64.0)
        if name == "texture":      # inside the central 4x4 only
            assert (changed <= 16).all() and (changed >= 8).all()


def test_combination_index_round_trip_and_the_enumeration_is_complete():
    k = np.arange(S.NUM_COMBINATIONS)
    v = S.combination_values(k)
    assert (S.combination_index(v) == k).all()
    assert len({tuple(r) for r in v.tolist()}) == S.NUM_COMBINATIONS == 4 * 4 * 4 * 2 * 2 * 2 * 4 * 4
    imgs = S.all_images().reshape(S.NUM_COMBINATIONS, -1)
    assert len(np.unique(imgs, axis=0)) == S.NUM_COMBINATIONS  # every combination is a distinct image


def test_shards_read_back_through_the_loader_equal_the_renderer(tmp_path):
    S.make_staged_shards(tmp_path / "s", 40, seed=3, maxcount=16)
    got_imgs, got_attrs = [], []
    for _, imgs, attrs in iter_batches(tmp_path / "s", 16):
        got_imgs.append(np.asarray(imgs))
        got_attrs.append(attrs)
    imgs, attrs = np.concatenate(got_imgs), np.concatenate(got_attrs)
    v = S.draw_values(3, np.arange(40))
    assert (imgs == S.render_uint8(v).transpose(0, 3, 1, 2)).all()
    assert (attrs == v).all()


# ----------------------------------------------------------------------------------------- exact Bayes

@pytest.fixture(scope="module")
def design():
    return bayes.Design()


def test_log_posterior_against_gaussian_log_densities(design):
    """log p(k | x_t) from the closed form equals normalised N(x_t; √ᾱ μ_k, (1−ᾱ) I) log densities."""
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, S.NUM_COMBINATIONS, (3,), generator=g)
    for t in (50, 300, 700):
        tt = torch.full((3,), t)
        a = design.ac[t]
        xt = a.sqrt() * design.means[pick] + (1 - a).sqrt() * torch.randn(3, design.means.shape[1], generator=g,
                                                                           dtype=torch.float64)
        normal = torch.distributions.Normal(a.sqrt() * design.means[None], (1 - a).sqrt())
        dens = normal.log_prob(xt[:, None]).sum(-1)                        # 3 × K
        ref = dens - torch.logsumexp(dens, 1, keepdim=True)
        torch.testing.assert_close(design.log_posterior(xt, tt), ref, rtol=0, atol=1e-6)


def test_posterior_is_certain_at_small_t_and_flat_at_large_t(design):
    v = S.draw_values(5, np.arange(16))
    x0 = design.means[S.combination_index(v)]
    skill0 = design.factor_skill(design.log_posterior(x0 * design.ac[0].sqrt(), torch.zeros(16, dtype=torch.long)), v)
    assert np.allclose(skill0, 1.0)
    lost = bayes.lost_steps(design, v, np.arange(0, 1000, 50))
    # the designed order: stage-1 factors are lost before the mark, the mark before stage-3 factors
    assert np.median(lost[:, FINE]) < np.median(lost[:, MIDDLE]) < np.median(lost[:, COARSE])


def test_posterior_mean_denoiser_beats_the_ddpm_less_predictors(design):
    """E[ε | x_t] has the smallest MSE: below the prior-mean denoiser and the x_t-proportional guess."""
    v = S.draw_values(7, np.arange(64))
    x0 = measure.images(v)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    best = bayes.bayes_eps_mse(design, x0, t, eps)
    a = design.ac[t].reshape(-1, 1)
    xt = a.sqrt() * x0.double().reshape(64, -1) + (1 - a).sqrt() * eps.double().reshape(64, -1)
    prior = (xt - a.sqrt() * design.means.mean(0)) / (1 - a).sqrt()
    assert best.mean() < ((prior - eps.double().reshape(64, -1)) ** 2).mean(1).mean()


# ----------------------------------------------------------------------------------------- the metric

def _codes(values: np.ndarray, factors: list[int]) -> np.ndarray:
    """Each factor as a point on a circle (2 dims): a change of value always moves it."""
    cols = []
    for f in factors:
        a = 2 * np.pi * values[:, f] / S.LEVELS[f]
        cols += [np.cos(a), np.sin(a)]
    return np.stack(cols, 1)


def hand_built(layout: str, key: int = 0, ignore: tuple = ()):
    """An encoder that reads the factors off the image (nearest design image) and writes groups of
    them into stages: ``ordered`` fine -> stage 1, mark -> 2, coarse -> 3; ``reversed`` coarse -> 1,
    fine -> 3; ``permuted``: the three groups go to stages in an order drawn per image."""
    design = bayes.Design()
    groups = [FINE, MIDDLE, COARSE]

    def encode(x: torch.Tensor) -> np.ndarray:
        k, _ = measure.nearest_combination(design, x)
        v = S.combination_values(k)
        z = np.zeros((len(v), sum(DIMS)))
        starts = np.cumsum([0, *DIMS])[:-1]
        for i in range(len(v)):
            order = {"ordered": [0, 1, 2], "reversed": [2, 1, 0],
                     "permuted": np.random.default_rng([key, int(k[i])]).permutation(3)}[layout]
            for g, stage in zip(groups, order):
                c = _codes(v[i:i + 1], [f for f in g if f not in ignore])[0] if set(g) - set(ignore) else []
                z[i, starts[stage]:starts[stage] + len(c)] = c
        return z
    return encode


@pytest.fixture(scope="module")
def known():
    """Squared stage distances of hand-built encoders, two 'training seeds' each (other test
    interventions, and for the permuted layout other per-image draws)."""
    v = S.draw_values(11, np.arange(120))

    def runs(layout, key):
        return [measure.stage_distances(hand_built(layout, key + 10 * seed), v, DIMS, seed=seed) for seed in (0, 1)]
    out = {"ordered": runs("ordered", 0), "reversed": runs("reversed", 0), "pdae": runs("permuted", 1)}
    for k in range(5):
        out[f"permuted{k}"] = runs("permuted", 100 + k)
    return out


PASS = {"g": {"pass": True}}


def _analyse(known, diti: str):
    return SS.analyse({"diti": known[diti], "pdae": known["pdae"]}, LOST_T, FINE, COARSE, ["diti"], "pdae",
                      resamples=300, seed=0)


def test_an_encoder_that_orders_by_noise_level_reproduces(known):
    res = _analyse(known, "ordered")
    i = res["I"]["diti"]
    assert i["pooled"]["point"] > 1.5 and all(s["ci"][0] > 0 for s in i["per_seed"])
    assert np.allclose(res["centres"]["diti"][FINE[0]], 1.0) and np.allclose(res["centres"]["diti"][COARSE[0]], 3.0)
    assert SS.decide(res, "diti", PASS)["verdict"] == "reproduced"


def test_a_permuted_encoder_gives_an_interval_covering_zero(known):
    """An encoder with no order, drawn like the baseline: I's 95% interval covers 0 (for at least 4
    of 5 independent draws: each covers with probability 0.95) and the rule never says reproduced."""
    covered = 0
    for k in range(5):
        res = _analyse(known, f"permuted{k}")
        lo, hi = res["I"]["diti"]["pooled"]["ci"]
        covered += lo <= 0 <= hi
        assert abs(res["I"]["diti"]["pooled"]["point"]) < 0.3
        assert SS.decide(res, "diti", PASS)["verdict"] != "reproduced"
    assert covered >= 4


def test_a_reversed_encoder_gives_negative_I_and_not_reproduced(known):
    res = _analyse(known, "reversed")
    assert res["I"]["diti"]["pooled"]["ci"][1] < 0
    assert SS.decide(res, "diti", PASS)["verdict"] == "not reproduced"


def test_a_failed_gate_makes_any_result_inconclusive(known):
    for name in ("ordered", "reversed"):
        d = SS.decide(_analyse(known, name), "diti", {"z_used": {"pass": False}, "ddpm": {"pass": True}})
        assert d["verdict"] == "inconclusive" and d["gates_failed"] == ["z_used"]


def test_sensitivity_finds_a_factor_the_encoder_ignores(known):
    v = S.draw_values(11, np.arange(120))
    blind = SS.sensitivity(measure.stage_distances(hand_built("ordered", ignore=(NAMES.index("dot"),)), v, DIMS))
    seen = SS.sensitivity(known["ordered"][0])
    assert blind[NAMES.index("dot")] == 0 and seen[NAMES.index("dot")] > 0.05
    others = [i for i in range(len(NAMES)) if i != NAMES.index("dot")]
    assert (blind[others] > 0.05).all()


def test_shares_and_centres_on_a_hand_computed_case():
    # two images, one factor, three stages; S = mean(to_factor) / mean(to_other) per stage
    d = SS.Distances(np.array([[[1.0, 0.0, 3.0]], [[3.0, 0.0, 1.0]]]), np.array([[4.0, 1.0, 4.0], [4.0, 1.0, 4.0]]))
    p = SS.shares(d)
    np.testing.assert_allclose(p, [[0.5, 0.0, 0.5]])
    np.testing.assert_allclose(SS.centres(p), [2.0])


def test_spearman_against_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 8).astype(float)  # ties, as stages have
        b = rng.normal(size=8)
        assert math.isclose(SS.spearman(a, b), stats.spearmanr(a, b).statistic, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_claim_runs_end_to_end_and_remeasures_to_the_same_numbers(tmp_path):
    """The only test that runs every phase (data, Bayes table, DDPM, six arm runs, measurement,
    analysis, report) through the real engine; ~1-2 min. Its second launch trains nothing and
    recomputes every measurement from the exports, which must reproduce the first launch's numbers."""
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "diti_fast.claim", "--smoke", "--work", str(work)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = json.loads((work / "results" / "claim.json").read_text())
    assert first["verdict"] == "inconclusive"       # the smoke DDPM is 4 steps old: its gate fails
    assert not first["gates"]["ddpm_samples"]["pass"]
    assert set(first["arms"]) == {f"{a}-s{s}" for a in ("diti", "diti_stopgrad", "pdae") for s in (0, 1)}
    assert all(a["images"] == 32 for a in first["arms"].values())
    for name in ("stage_share.png", "effect.png", "losses.png", "ddpm_vs_bayes.png", "ddpm_samples.png", "claim.md"):
        assert (work / "results" / name).stat().st_size > 0
    ddpm_lines = (work / "ddpm" / "metrics.jsonl").read_text()
    shutil.rmtree(work / "measure")
    shutil.rmtree(work / "results")
    (work / "ddpm_gate.json").unlink()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "training" not in r.stdout.replace("training path", "") and "steps=0->" not in r.stdout
    assert (work / "ddpm" / "metrics.jsonl").read_text() == ddpm_lines
    second = json.loads((work / "results" / "claim.json").read_text())
    for key in ("stage_share", "gates", "measured", "ddpm_gate"):
        assert second[key] == first[key], key
    assert len(second["launches"]) == 2


# ----------------------------------------------------------------------------------------- speed probe

def test_the_probe_picks_the_fastest_agreeing_path_and_charges_compile_time(monkeypatch):
    from diti_fast.claim import speed
    rates = {("fp32", False, False): (100.0, 1.0), ("bf16", False, False): (300.0, 1.02),  # fastest, loss off by 2%
             ("fp32", True, False): (120.0, 1.001), ("fp32", False, True): (200.0, 1.0)}
    setups = {("fp32", False, True): 200.0}

    def fake(unet0, cfg, precision, cl, comp, batch, steps, warmup, seed=0):
        r, loss = rates[(precision, cl, comp)]
        return {"precision": precision, "channels_last": cl, "compile": comp, "images_per_s": r,
                "setup_s": setups.get((precision, cl, comp), 0.5), "initial_loss": loss}
    monkeypatch.setattr(speed, "_probe", fake)
    monkeypatch.setattr(speed, "_probe_compiled", lambda u, c, p, b, s, w, t: fake(u, c, p, False, True, b, s, w))
    from diti_fast.engine.config_files import load_config
    model = load_config("claim16", []).model
    # bf16 is faster but disagrees, so fp32 carries on; compile's 200 s setup in a 300 s run leaves
    # 100 s x 200/s = 20,000 images, below channels_last's 300 s x 120/s = 36,000.
    res = speed.choose(model, 64, run_seconds=300, log=lambda m: None)
    assert (res["chosen"]["precision"], res["chosen"]["channels_last"], res["chosen"]["compile"]) == ("fp32", True, False)
    assert not [r for r in res["candidates"] if r["precision"] == "bf16"][0]["agrees"]
    res = speed.choose(model, 64, run_seconds=3000, log=lambda m: None)   # a long run pays for the compile
    assert res["chosen"]["compile"]


def test_a_compile_slower_than_its_limit_is_cut_off_and_recorded():
    from diti_fast.claim import speed
    from diti_fast.engine.config_files import load_config
    from diti_fast.nn import UNet
    cfg = load_config("claim16", []).model
    with pytest.raises(speed.CompileTimeout, match="did not finish"):
        speed._probe_compiled(UNet(cfg.unet), cfg, "fp32", 4, 1, 1, timeout=0.5)
