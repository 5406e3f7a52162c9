"""benchmarks/parity.py's statistics: per-t-bucket loss ratios with paired / unpaired bootstrap intervals."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "parity.py"
_spec = importlib.util.spec_from_file_location("parity", _PATH)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


def test_bucket_table_keeps_the_last_steps_and_marks_empty_buckets():
    rows = [[float(i), None] for i in range(150)]
    t = parity.bucket_table(rows)
    assert t.shape == (100, 2) and t[0, 0] == 50.0 and np.isnan(t[:, 1]).all()


def test_paired_bootstrap_removes_shared_noise():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.05, (100, 3))          # per-step bucket means, noisy
    case = base * np.array([1.0, 1.03, 0.9])       # the same steps, scaled per bucket
    paired = parity.ratio_intervals(case, base, paired=True, n_boot=500)
    for iv, r in zip(paired, (1.0, 1.03, 0.9)):
        assert iv["ratio"] == pytest.approx(r) and iv["lo"] == pytest.approx(r) and iv["hi"] == pytest.approx(r)
    unpaired = parity.ratio_intervals(case, base, paired=False, n_boot=500)
    assert all(iv["hi"] - iv["lo"] > 0.05 for iv in unpaired)  # independent resamples see the step noise
    assert parity.within(paired[:2]) and not parity.within(paired)
