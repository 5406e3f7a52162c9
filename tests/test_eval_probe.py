"""Linear probe: planted vs random attributes, metrics equal to scikit-learn's, model selection."""
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score

from diti_fast.eval.probe import AttributeSpec, ProbeConfig, attribute_metrics, specs_from_manifest, train_probe


def _split(x, y, n_train, n_val):
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_val], y[n_train:n_train + n_val]), \
        (x[n_train + n_val:], y[n_train + n_val:])


@pytest.fixture(scope="module")
def planted():
    """Features with a planted linearly separable binary attribute, a 3-class attribute decided by the
    arg-max of three feature directions, a linear continuous attribute and a pure-noise binary attribute."""
    rng = np.random.default_rng(0)
    n, d = 3000, 24
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d)
    sep = (x @ w > 0.5).astype(np.float32)                       # base rate ≈ 0.4, separable by construction
    cat = np.argmax(x[:, :3] * 3.0, axis=1).astype(np.float32)
    cont = (x @ rng.standard_normal(d) * 0.3 + 2.0).astype(np.float32)
    noise = (rng.random(n) < 0.3).astype(np.float32)            # independent of x
    y = np.stack([sep, cat, cont, noise], 1)
    specs = [AttributeSpec("sep", "binary"), AttributeSpec("cat", "categorical", 3),
             AttributeSpec("cont", "continuous"), AttributeSpec("noise", "binary")]
    # lr 1e-2: 2000 samples give 16 steps an epoch, too few for the paper's 1e-3 to get past the random init.
    res = train_probe(*_split(x, y, 2000, 400), specs, ProbeConfig(epochs=8, lr=1e-2, seed=0))
    return res, x, y, specs


def test_planted_attribute_reaches_ap_one_and_random_stays_at_base_rate(planted):
    res, _, y, _ = planted
    m = {a["name"]: a for a in res.test}
    assert m["sep"]["ap"] > 0.98
    assert m["cat"]["accuracy"] > 0.9
    assert m["cont"]["pearson_r"] > 0.95
    base = y[2400:, 3].mean()
    assert m["noise"]["base_rate"] == pytest.approx(base)
    # AP of an uninformative ranking is the base rate up to sampling noise (600 test samples: sd ≈ 0.03).
    assert abs(m["noise"]["ap"] - base) < 0.08
    assert m["noise"]["skill"] < 0.12 < m["sep"]["skill"]


def test_reported_ap_is_sklearns_on_the_probe_scores(planted):
    res, _, y, _ = planted
    y_test = y[2400:]
    # Output layout: sep (1 logit), cat (3 logits), cont (1), noise (1).
    assert res.test[0]["ap"] == average_precision_score(y_test[:, 0], res.test_scores[:, 0])
    assert res.test[3]["ap"] == average_precision_score(y_test[:, 3], res.test_scores[:, 5])
    assert res.test[1]["accuracy"] == accuracy_score(y_test[:, 1], res.test_scores[:, 1:4].argmax(1))
    assert res.summary["mean_ap"] == pytest.approx((res.test[0]["ap"] + res.test[3]["ap"]) / 2)


def test_ap_closed_form():
    # Ranking P, N, P, N: precision at the two positives is 1 and 2/3, so AP = (1 + 2/3) / 2 = 5/6.
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    m = attribute_metrics(scores, np.array([[1.0], [0.0], [1.0], [0.0]]), [AttributeSpec("a", "binary")])[0]
    assert m["ap"] == pytest.approx(5 / 6)
    assert m["base_rate"] == 0.5
    assert m["skill"] == pytest.approx((5 / 6 - 0.5) / 0.5)
    # -1/1 tables (CelebA's raw encoding) mean the same thing.
    m2 = attribute_metrics(scores, np.array([[1.0], [-1.0], [1.0], [-1.0]]), [AttributeSpec("a", "binary")])[0]
    assert m2["ap"] == m["ap"]


def test_undefined_metrics_are_nan_not_errors():
    spec = [AttributeSpec("a", "binary"), AttributeSpec("c", "continuous")]
    m = attribute_metrics(np.zeros((5, 2)), np.column_stack([np.zeros(5), np.ones(5)]), spec)
    assert math.isnan(m[0]["ap"]) and math.isnan(m[1]["pearson_r"])


def test_selects_the_epoch_with_the_best_validation_score(planted):
    res = planted[0]
    assert len(res.val_history) == 8
    assert res.best_epoch == int(np.nanargmax(res.val_history))


def test_deterministic_for_a_seed(planted):
    _, x, y, specs = planted
    a = train_probe(*_split(x[:600], y[:600], 400, 100), specs, ProbeConfig(epochs=2, seed=3))
    b = train_probe(*_split(x[:600], y[:600], 400, 100), specs, ProbeConfig(epochs=2, seed=3))
    np.testing.assert_array_equal(a.test_scores, b.test_scores)


def test_specs_from_manifest_rejects_bad_kinds():
    assert specs_from_manifest([{"name": "c", "kind": "categorical", "num_classes": 4}])[0].width == 4
    with pytest.raises(ValueError, match="kind"):
        specs_from_manifest([{"name": "x", "kind": "ordinal"}])
