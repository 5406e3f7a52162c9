"""``diti-fast doctor`` (diti_fast.selfcheck): reports versions and device, degrades on a CPU machine,
and says NOT ready when a check fails."""
import json

import pytest
import torch

from diti_fast import selfcheck
from diti_fast.cli import main as cli_main


def test_doctor_reports_versions_device_and_checks(capsys):
    assert cli_main(["doctor", "--json", "--skip-deepspeed-op"]) == 0
    r = json.loads(capsys.readouterr().out)
    import deepspeed
    import triton
    assert r["versions"]["torch"] == torch.__version__
    assert r["versions"]["triton"] == triton.__version__ and r["versions"]["deepspeed"] == deepspeed.__version__
    assert r["cuda"]["available"] == torch.cuda.is_available() and r["ok"] is True
    assert r["checks"]["engine_fused_adam"]["status"] == "ok"
    assert r["checks"]["deepspeed_fused_adam"]["status"] == "skipped"
    if not torch.cuda.is_available():  # this CPU machine: the GPU checks say why they did not run
        assert r["checks"]["triton_kernels"]["status"] == "skipped"
        assert "no CUDA device" in r["checks"]["triton_kernels"]["detail"]
    else:
        assert r["checks"]["triton_kernels"]["status"] == "ok"


def test_doctor_text_and_a_failed_check(monkeypatch, capsys):
    assert selfcheck.main(["--skip-deepspeed-op"]) == 0
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__}" in out and "CUDA device:" in out and "result: ready" in out
    real = torch.optim.Adam

    def broken(*a, fused=None, **k):
        if fused:
            raise RuntimeError("fused Adam is not supported on this device")
        return real(*a, **k)
    monkeypatch.setattr(torch.optim, "Adam", broken)
    assert selfcheck.main(["--skip-deepspeed-op"]) == 1
    out = capsys.readouterr().out
    assert "engine's fused Adam      FAILED: torch.optim.Adam(fused=True)" in out
    assert "fused Adam is not supported on this device" in out and "result: NOT ready" in out


def test_a_missing_required_package_is_not_ready(monkeypatch):
    monkeypatch.setattr(selfcheck, "_version", lambda name: None if name == "webdataset" else "1.0")
    r = selfcheck.run(skip_deepspeed_op=True)
    assert r["ok"] is False and r["missing"] == ["webdataset"]
    assert "missing required packages: webdataset" in selfcheck.format_report(r)
