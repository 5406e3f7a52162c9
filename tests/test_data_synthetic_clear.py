"""The synthetic dataset's ``clear`` variant: deterministic, visible, independent factors, and its
stored factors are what the pixels show (read back from the pixels with rules written from the
variant's definition in data_shards/synthetic_clear.py)."""

import numpy as np
import pytest

from data_shards import synthetic_clear as sc
from data_shards.synthetic import make_synthetic_shards
from diti_fast.data import eval_loader, read_manifest

S = 32
COL = {n: i for i, n in enumerate(sc.ATTRIBUTE_NAMES)}


def test_deterministic_and_order_independent():
    a_img, a_att = sc.render(range(30), S, seed=3)
    b_img, b_att = sc.render([29, 4, 11], S, seed=3)
    assert np.array_equal(b_img, a_img[[29, 4, 11]]) and np.array_equal(b_att, a_att[[29, 4, 11]])
    c_img, _ = sc.render(range(30), S, seed=4)
    assert (c_img != a_img).any(axis=(1, 2, 3)).all()


def test_shards_of_the_clear_variant(tmp_path):
    m = make_synthetic_shards(tmp_path, 90, image_size=S, seed=2, maxcount=40, variant=sc.CLEAR)
    assert m["params"]["variant"] == "clear" and m["params"]["generator"] == sc.GENERATOR
    assert [a["name"] for a in read_manifest(tmp_path)["attributes"]] == sc.ATTRIBUTE_NAMES
    ref_img, ref_att = sc.render(range(90), S, seed=2)
    seen = 0
    for batch in eval_loader(tmp_path, batch_size=32):
        idx = batch["index"].numpy()
        assert np.array_equal(batch["image"].numpy(), ref_img[idx].transpose(0, 3, 1, 2))
        assert np.array_equal(batch["attrs"].numpy(), ref_att[idx])
        seen += len(idx)
    assert seen == 90
    with pytest.raises(ValueError, match="unknown synthetic variant 'nope'"):
        make_synthetic_shards(tmp_path / "x", 5, variant="nope")


def test_no_clipping_and_salt_and_pepper_density():
    img, att = sc.render(range(400), S, seed=0)
    grey = img.astype(np.int64)
    dot = (grey == 0).all(-1) | (grey == 255).all(-1)
    # Everything but the dots lies strictly inside [0, 255]: palette 64..192 ± 24 stripes.
    assert grey[~dot].min() >= 64 - 24 - 1 and grey[~dot].max() <= 192 + 24 + 1
    frac = dot.reshape(len(img), -1).mean(1)
    # The hit count is binomial(1024, density): |frac - density| has mean ~0.004 at these densities.
    err = np.abs(frac - att[:, COL["speckle"]])
    assert err.mean() < 0.006 and np.corrcoef(frac, att[:, COL["speckle"]])[0, 1] > 0.93
    assert abs(frac.mean() - sc.SPECKLE_MAX / 2) < 0.004


def _stripe_peak(img: np.ndarray):
    """Dominant spatial frequency of the grey image (DC and the lowest band removed): the stripes'."""
    g = img.astype(np.float64).mean(-1)
    g = g - g.mean()
    f = np.abs(np.fft.fft2(g))
    fy, fx = np.meshgrid(np.fft.fftfreq(S), np.fft.fftfreq(S), indexing="ij")
    rad = np.hypot(fx, fy)
    f[rad < 0.12] = 0  # shape edges live at low frequencies; the longest stripe period is 5.5 px = 0.18 cycles/px
    iy, ix = np.unravel_index(np.argmax(f), f.shape)
    return 1.0 / rad[iy, ix], np.degrees(np.arctan2(fy[iy, ix], fx[iy, ix])) % 180


def test_stripes_read_back_from_pixels():
    img, att = sc.render(range(120), S, seed=1)
    ok_p = ok_o = 0
    for i in range(len(img)):
        period, angle = _stripe_peak(img[i])
        want_p = sc.STRIPE_PERIODS[int(att[i, COL["stripe_period"]])]
        want_o = sc.STRIPE_ORIENTATIONS[int(att[i, COL["stripe_orientation"]])]
        ok_p += abs(period - want_p) / want_p < 0.2  # the FFT grid is coarse at 32 px
        ok_o += min(abs(angle - want_o), 180 - abs(angle - want_o)) < 12
    assert ok_p >= 0.9 * len(img) and ok_o >= 0.9 * len(img)


def test_factors_are_independent():
    _, att = sc.render(range(3000), S, seed=7)
    c = np.corrcoef(att.T)
    off = np.abs(c[~np.eye(len(c), dtype=bool)])
    assert off.max() < 0.07  # 3000 samples: |r| of independent columns ~ N(0, 0.018)
    # The classic variant's flaw: the spread of the position depended on the size. Not here.
    small = att[:, COL["size"]] < np.median(att[:, COL["size"]])
    for k in ("pos_x", "pos_y"):
        s1, s2 = att[small, COL[k]].std(), att[~small, COL[k]].std()
        assert abs(s1 / s2 - 1) < 0.08


def test_redraw_changes_one_factor_and_fine_deltas_are_positive():
    f = sc.draw_factors(0, np.arange(50), S)
    rng = np.random.default_rng(0)
    for name in sc.ATTRIBUTE_NAMES:
        g = sc.redraw(f, name, rng)
        for k in sc.ATTRIBUTE_NAMES:
            assert (g[k] != f[k]).all() if k == name else np.array_equal(g[k], f[k])
    d = sc.factor_deltas(64, S)
    assert set(d) == set(sc.ATTRIBUTE_NAMES)
    # A factor change always changes the image (speckle: unless both densities hit no pixel, rare).
    assert all((v > 0).mean() > 0.9 for v in d.values())
