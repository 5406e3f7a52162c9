"""Attribute manipulation: the pieces against closed forms / torch, the edit on a tiny *trained* DiTi
(tests/fixtures/manip_tiny, made by tests/fixtures/make_manip_tiny.py) moving the classifier's own score
the intended way, the statistics/classifier cache, and clean errors."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import synthetic
from diti_fast.eval import manipulate as M
from diti_fast.eval.commands import main
from diti_fast.eval.features import EvalError
from diti_fast.weights import export_path

FIXTURE = Path(__file__).parent / "fixtures" / "manip_tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 32 px batches: intra-op threads cost more than they give on a 2-core runner."""
    from diti_fast.eval.probe import _single_thread
    with _single_thread(torch.device("cpu")):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("manip")
    export_path(root / "run").parent.mkdir(parents=True)
    shutil.copy(export_path(FIXTURE), export_path(root / "run"))  # outputs go beside the export: not into tests/
    synthetic.make_synthetic_shards(root / "shards", 300, image_size=32, seed=5, maxcount=300)
    return root


def test_d_prime_closed_form():
    # dim 0: positives {2, 4}, negatives {0, 2}: means 3 vs 1, population variances 1 and 1 -> d' = 2.
    # dim 1: identical sides -> 0; dim 2: constant -> 0 (no division by zero).
    u = np.array([[2, 5, 1], [4, 7, 1], [0, 5, 1], [2, 7, 1]], np.float64)
    y = np.array([1, 1, 0, 0])
    np.testing.assert_allclose(M.d_prime(u, y), [2.0, 0.0, 0.0])
    assert M.d_prime(u, np.ones(4)).tolist() == [0.0, 0.0, 0.0]  # no negatives
    m = M.top_dims_mask(np.c_[u, u[:, :1] * 3], y, 1)  # dim 3 = 3 x dim 0: same d', lower index wins
    assert m.tolist() == [1, 0, 0, 0]
    assert M.top_dims_mask(u, y, 0).tolist() == [1, 1, 1]


def test_latent_stats_match_torch_std():
    z = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32) * [1, 2, 3, 4, 5, 0]
    mean, std = M.latent_stats(z)
    t = torch.from_numpy(z).double()
    np.testing.assert_allclose(mean, t.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(std[:5], t.std(0).numpy()[:5], rtol=1e-6)  # unbiased, as Tensor.std
    assert std[5] == 1.0  # a constant dim is left unscaled


def test_edit_is_the_standardised_step():
    rng = np.random.default_rng(1)
    D = 16
    w = np.zeros((2, D), np.float32)
    w[0, :3] = [3.0, -4.0, 0.0]  # masked row: |w| = 5
    w[1] = rng.normal(size=D)
    d = M.Directions("a", "categorical", ["x", "y"], rng.normal(size=D).astype(np.float32),
                     rng.uniform(0.5, 2, size=D).astype(np.float32), (w != 0).astype(np.float32), w,
                     np.zeros(2, np.float32), [1.0, 1.0], [None, None])
    z = torch.from_numpy(rng.normal(size=(3, D)).astype(np.float32))
    for s in (-1.0, 0.0, 0.5):
        du = d.standardise(d.edit(z, 0, s)) - d.standardise(z)
        want = torch.zeros(D)
        want[:2] = torch.tensor([0.6, -0.8]) * s * math.sqrt(D)  # s·√D·ŵ, ŵ = w/|w|
        torch.testing.assert_close(du, want.expand(3, D), atol=1e-5, rtol=1e-5)
    # The classifier's score is a sigmoid of the standardised logit.
    u = d.standardise(z)
    torch.testing.assert_close(d.scores(z), torch.sigmoid(u @ torch.from_numpy(w).T))


def test_effect_reports_the_mean_score_change_with_its_spread_and_invisible_edits():
    x0 = torch.zeros(3, 3, 4, 4)
    s_in = torch.tensor([0.2, 0.5, 0.4])
    edited = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.6], [0.3, 0.4, 0.41]])  # scales -1, 0, +1
    imgs = torch.zeros(3, 3, 3, 4, 4)
    imgs[:, 0] = 10 / 127.5   # s=-1: 10 grey levels from the s=0 decode
    imgs[:, 2] = 0.5 / 127.5  # s=+1: half a grey level: not visible
    e = M.effect_summary(s_in, edited, imgs, x0, [-1.0, 0.0, 1.0])
    up = np.array([0.3 - 0.2, 0.6 - 0.5, 0.41 - 0.4])
    assert e["1"]["score_change_mean"] == pytest.approx(up.mean(), abs=1e-6)
    assert e["1"]["score_change_std"] == pytest.approx(up.std(), abs=1e-6)
    assert (e["1"]["pixel_change"], e["1"]["visible"]) == (pytest.approx(0.5, rel=1e-5), False)
    assert (e["-1"]["pixel_change"], e["-1"]["visible"]) == (pytest.approx(10.0, rel=1e-5), True)
    line = M.describe_effect("Smiling", e, 3)
    assert "s=+1: score +0.070 ± 0.042 (mean ± sd over 3 images), pixels 0.5/255 (no visible effect)" in line
    assert "s=-1: score -0.067 ± 0.047" in line and "the edit has no visible effect" not in line
    # Only an invisible edit (no s=0 column: measured against the input): said so for the whole edit.
    only = M.effect_summary(s_in, edited[:, 2:], imgs[:, 2:], x0, [1.0])
    assert only["1"]["pixel_change"] == pytest.approx(0.5, rel=1e-5)
    assert "the edit has no visible effect" in M.describe_effect("Smiling", only, 3)


def test_manipulation_moves_the_score_and_reuses_the_cache(env, monkeypatch):
    cfg = M.ManipConfig(lr=1e-2)
    res = M.run_manipulation(env / "run", env / "shards", "shape", [-1.0, 1.0], "cpu", cfg, num=6, steps=10,
                             invert_steps=10, log=lambda m: None)
    assert not res["cached"] and set(res["directions"]) == {"circle", "square", "triangle"}
    ups = [d["moved"]["up"] for d in res["directions"].values()]
    downs = [d["moved"]["down"] for d in res["directions"].values()]
    # Pooled over the three one-vs-rest directions, most edited images move the classifier's own score
    # up at s = +1 and down at s = -1 (chance: 1/2).
    assert np.mean(ups) > 0.6 and np.mean(downs) > 0.6, (ups, downs)
    data = json.loads(Path(res["json"]).read_text())
    assert data["classifier"]["mask_dims"] == [16, 16, 16] and len(data["directions"]["square"]["scores"]) == 6
    for name in ("circle", "square", "triangle"):
        assert (env / "run" / "eval" / "manipulate" / f"manipulate_shape={name}.png").is_file()
    # Second call: statistics, masks and classifiers come from RUN/eval/manipulate, nothing is refitted.
    monkeypatch.setattr(M, "fit_directions", lambda *a, **k: pytest.fail("refitted"))
    again = M.run_manipulation(env / "run", env / "shards", "shape", [1.0], "cpu", cfg, num=1, classes=["square"],
                               steps=2, invert_steps=2, log=lambda m: None)
    assert again["cached"] and list(again["directions"]) == ["square"]
    assert again["classifier"] == res["classifier"]


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_clear_errors(env, tmp_path, capsys):
    base = ["manipulate", "--run", str(env / "run"), "--data", str(env / "shards")]
    _fails(base + ["--attr", "smile"], capsys, "attribute 'smile' is not in the data's manifest", "colour")
    _fails(base + ["--attr", "size"], capsys, "'continuous'", "eval regress")
    _fails(base + ["--attr", "shape", "--class", "hexagon", "--num", "1", "--steps", "1", "--invert-steps", "1"],
           capsys, "--class hexagon", "circle, square, triangle")
    (tmp_path / "empty").mkdir()
    _fails(["manipulate", "--run", str(tmp_path / "empty"), "--data", str(env / "shards"), "--attr", "shape"], capsys,
           str(export_path(tmp_path / "empty")))
    # A DDPM export has no encoder: named as such.
    from diti_fast.nn import build_unet
    from diti_fast.weights import load_export, save_export
    cfg = load_export(env / "run").model_cfg
    save_export(export_path(tmp_path / "ddpm"), "ddpm", cfg, {"data": {"image_size": 32}}, unet=build_unet(cfg))
    _fails(["manipulate", "--run", str(tmp_path / "ddpm"), "--data", str(env / "shards"), "--attr", "shape"], capsys,
           "'ddpm' export")
    with pytest.raises(EvalError, match="--mask-dims"):
        M.ManipConfig(mask_dims=65).validate(64)
