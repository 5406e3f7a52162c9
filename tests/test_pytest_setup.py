"""The test runner's own setup: plain pytest works without the dev extra's pytest-benchmark."""
import subprocess
import sys

import pytest

from conftest import REPO


def test_plain_pytest_runs_without_pytest_benchmark():
    # -p no:benchmark: as if the plugin were not installed. Collection alone shows the options parse.
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:benchmark", "-q", "--co",
                        "tests/test_masks_prefix.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "test_masks_prefix.py::" in r.stdout


def test_benchmarks_are_off_in_a_plain_run(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed")
    if request.config.getoption("benchmark_enable"):
        pytest.skip("run with --benchmark-enable")
    assert request.config._benchmarksession.disabled
