"""The embedded synthetic dataset: deterministic, and its stored factors are what the pixels show."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from data_shards.synthetic import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    BACKGROUND,
    COLOURS,
    SHAPES,
    STRIPE_ORIENTATIONS,
    STRIPE_PERIODS,
    make_synthetic_shards,
    render,
)
from diti_fast.data import eval_loader, read_manifest

S = 32


def test_deterministic_and_prefix_stable():
    a_img, a_att = render(range(40), S, seed=5)
    b_img, b_att = render(range(40), S, seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_att, b_att)
    # Sample i depends on (seed, i) only: any subset or order gives the same sample.
    c_img, c_att = render([33, 2, 17], S, seed=5)
    assert np.array_equal(c_img, a_img[[33, 2, 17]]) and np.array_equal(c_att, a_att[[33, 2, 17]])
    d_img, _ = render(range(40), S, seed=6)
    assert (d_img != a_img).any(axis=(1, 2, 3)).all()


def test_shards_do_not_depend_on_worker_count(tmp_path):
    m1 = make_synthetic_shards(tmp_path / "w1", 300, image_size=16, seed=2, maxcount=70, workers=1)
    m2 = make_synthetic_shards(tmp_path / "w2", 300, image_size=16, seed=2, maxcount=70, workers=2)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    for s in m1["shards"]:
        digest = hashlib.sha256(Path(tmp_path / "w1" / s["name"]).read_bytes()).hexdigest()
        assert digest == s["sha256"]
    # Different shard size, same samples.
    make_synthetic_shards(tmp_path / "w3", 300, image_size=16, seed=2, maxcount=128, workers=2)
    ref_img, ref_att = render(range(300), 16, seed=2)
    seen = 0
    for batch in eval_loader(tmp_path / "w3", batch_size=64):
        idx = batch["index"].numpy()
        assert np.array_equal(batch["image"].numpy(), ref_img[idx].transpose(0, 3, 1, 2))
        assert np.array_equal(batch["attrs"].numpy(), ref_att[idx])
        seen += len(idx)
    assert seen == 300


def test_manifest_describes_factors(tmp_path):
    make_synthetic_shards(tmp_path, 50, image_size=S, seed=0, maxcount=20)
    m = read_manifest(tmp_path)
    assert m["num_samples"] == 50 and m["image_size"] == S and m["channels"] == 3
    assert [a["name"] for a in m["attributes"]] == ATTRIBUTE_NAMES
    groups = {a["group"] for a in m["attributes"]}
    assert groups == {"coarse", "fine"}
    kinds = {a["name"]: a["kind"] for a in m["attributes"]}
    assert kinds["shape"] == "categorical" and kinds["size"] == "continuous"
    assert [s["num_samples"] for s in m["shards"]] == [20, 20, 10]


def _recover(img: np.ndarray):
    """Read the factors back from pixels with trivial rules written from the dataset's description
    (docs/data.md), not from the code."""
    im = img.astype(np.float64)
    mask = np.abs(im - np.array(BACKGROUND)).max(-1) > 100  # shape vs background: ≥140 vs ≤60 grey levels
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = mask.sum() / ((y1 - y0) * (x1 - x0))  # square 1, circle π/4, triangle 1/2
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
    palette = np.array(list(COLOURS.values()), float)
    colour = list(COLOURS)[int(np.argmin(((palette - np.median(im[mask], 0)) ** 2).sum(1)))]
    grey = im.mean(-1)
    resid = np.where(mask, 0.0, grey - np.median(grey[~mask]))
    spectrum = np.abs(np.fft.fft2(resid))
    spectrum[0, 0] = 0
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    n = img.shape[0]
    fy, fx = (ky + n // 2) % n - n // 2, (kx + n // 2) % n - n // 2
    freq = np.hypot(fx, fy) / n
    period = int(np.argmin([abs(freq - 1 / p) for p in STRIPE_PERIODS]))
    angle = np.degrees(np.arctan2(fy, fx)) % 180
    orient = int(np.argmin([min(abs(angle - o), 180 - abs(angle - o)) for o in STRIPE_ORIENTATIONS]))
    speckled = (np.abs(resid[~mask]) > 25).mean()  # stripes stay within ±12, speckle dots are ±48
    return dict(shape=SHAPES.index(shape), colour=list(COLOURS).index(colour),
                pos_x=(x0 + x1) / 2 / n, pos_y=(y0 + y1) / 2 / n, size=(x1 - x0) / 2 / n,
                stripe_period=period, stripe_orientation=orient, speckle=speckled)


def test_factors_are_visible_in_pixels():
    images, attrs = render(range(300), S, seed=11)
    truth = {n: attrs[:, i] for i, n in enumerate(ATTRIBUTE_NAMES)}
    got = [_recover(im) for im in images]
    col = {k: np.array([g[k] for g in got]) for k in got[0]}
    assert (col["shape"] == truth["shape"]).all()
    assert (col["colour"] == truth["colour"]).all()
    assert np.abs(col["pos_x"] - truth["pos_x"]).max() < 1.5 / S
    assert np.abs(col["pos_y"] - truth["pos_y"]).max() < 1.5 / S
    assert np.abs(col["size"] - truth["size"]).max() < 1.5 / S
    assert (col["stripe_period"] == truth["stripe_period"]).mean() > 0.95
    assert (col["stripe_orientation"] == truth["stripe_orientation"]).mean() > 0.95
    assert np.corrcoef(col["speckle"], truth["speckle"])[0, 1] > 0.8
    # Every class actually occurs.
    for name in ("shape", "colour", "stripe_period", "stripe_orientation"):
        spec = next(a for a in ATTRIBUTES if a["name"] == name)
        assert set(np.unique(truth[name]).astype(int)) == set(range(spec["num_classes"]))


def test_fine_factors_are_fine_and_coarse_ones_coarse():
    """4x4 box averaging (what a little diffusion noise does to detail) erases the texture but
    keeps the shape: the fine/coarse split the DiTi demo relies on."""
    images, _ = render(range(100), S, seed=4)
    ratios = []
    for im in images.astype(np.float64):
        full_mask = np.abs(im - np.array(BACKGROUND)).max(-1) > 100
        small = im.reshape(8, 4, 8, 4, 3).mean((1, 3))
        small_bg = ~full_mask.reshape(8, 4, 8, 4).any((1, 3))  # blocks of pure background
        small_shape = full_mask.reshape(8, 4, 8, 4).all((1, 3))
        assert small_shape.any(), "the shape should survive 4x downsampling"
        assert np.abs(small[small_shape] - np.array(BACKGROUND)).max(-1).min() > 100
        ratios.append(small[small_bg].mean(-1).std() / im[~full_mask].mean(-1).std())
    # Stripes of period 2.5-4 px and single-pixel speckle lose ~3/4 of their amplitude.
    assert np.median(ratios) < 0.4


@pytest.mark.parametrize("size", [8, 64])
def test_other_sizes(size):
    images, attrs = render(range(6), size, seed=0)
    assert images.shape == (6, size, size, 3) and images.dtype == np.uint8
    assert attrs.shape == (6, len(ATTRIBUTES))
