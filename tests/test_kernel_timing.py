"""benchmarks/kernel_timing.py: the CPU rehearsal (``--tiny``) writes the JSON the GPU run writes,
with traffic and bandwidth computed consistently; its preset table matches configs/ and its
GroupNorm shapes match the ShiftUNet's."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "kernel_timing.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import kernel_timing as kt  # noqa: E402

sys.path.pop(0)

ROW_KEYS = {"op", "layout", "shape", "dtype", "direction", "us_per_call", "bytes", "gb_s", "frac_of_copy"}
ELEM = {"bf16": 2, "fp32": 4}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the CPU rehearsal runs only without CUDA (with CUDA the script times the real shapes)")
    out = tmp_path_factory.mktemp("kt") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--tiny"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def expected_bytes(row) -> int:
    """Traffic from the row's shape, dtype and direction alone: every tensor read or written once."""
    e = ELEM[row["dtype"]]
    if row["op"] == "adaptive_group_norm":
        B, C, H, W = row["shape"]
        G = row["groups"]
        image = B * C * H * W * e
        per_bc = B * C * e                  # one [B, C] modulation (a chunk view of [B, 2C])
        params = 2 * C * 4 + 4 * per_bc     # fp32 weight and bias, scale/shift/z_scale/z_shift
        stats = B * G * 3 * 4               # fp32 (K, delta, rstd) per sample and group
        fwd = image + image + params + stats                                   # x in, y out
        bwd = 2 * image + image + stats + params + 2 * B * C * 4 + 4 * per_bc  # dy, x in; dx out
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[row["direction"]]
    B, ch, H, W = row["shape"]
    n = B * ch * H * W * e
    # eps, eps_hat, g in; t (int64) read by both launches and 2 gathered fp32 table entries per
    # sample; loss, per-sample losses, 10 bucket sums (fp32) and counts (int64) out
    fwd = 3 * n + 2 * 8 * B + 2 * 4 * B + 4 + 4 * B + 10 * (4 + 8)
    return fwd + (3 * n if row["direction"] == "fwd+bwd" else 0)  # dL/dg written, read, rescaled


def test_rehearsal_json_structure(rehearsal):
    doc = rehearsal
    assert doc["rehearsal"] is True and "meaningless" in doc["note"]
    assert doc["device"].startswith("cpu")
    assert doc["copy_gb_s"] > 0
    assert doc["truncated"] is False
    rows = doc["rows"]
    for row in rows:
        assert ROW_KEYS <= set(row), row
    seen = {(r["op"], r["layout"], r["dtype"], r["direction"]) for r in rows}
    for layout in ("nchw", "nhwc"):
        for dt in ("bf16", "fp32"):
            for d in ("fwd", "bwd", "fwd+bwd"):
                assert ("adaptive_group_norm", layout, dt, d) in seen
            for d in ("fwd", "fwd+bwd"):
                assert ("diti_loss", layout, dt, d) in seen
    # the channels_last rows ran the widened plan, and were timed against the previous one
    nhwc = [r for r in rows if r["op"] == "adaptive_group_norm" and r["layout"] == "nhwc"]
    assert all(r["plan"]["fwd"]["gpb"] > 1 for r in nhwc)
    assert all(r["prev_plan"]["fwd"]["gpb"] < r["plan"]["fwd"]["gpb"] and r["us_per_call_prev_plan"] > 0
               for r in nhwc)
    host = doc["host_overhead_us"]["dispatch"]
    for name in ("adaptive_group_norm.fwd", "adaptive_group_norm.fwd+bwd", "diti_loss.fwd", "diti_loss.fwd+bwd"):
        h = host[name]
        assert h["before_us"] > 0 and h["after_us"] > 0
        assert h["ratio"] == pytest.approx(h["before_us"] / h["after_us"], rel=0.01)


def test_rehearsal_bytes_and_bandwidth_are_consistent(rehearsal):
    copy = rehearsal["copy_gb_s"]
    for row in rehearsal["rows"]:
        assert row["bytes"] == expected_bytes(row), row
        gbs = row["bytes"] / (row["us_per_call"] * 1e-6) / 1e9
        assert row["gb_s"] > 0 and row["gb_s"] == pytest.approx(gbs, rel=1e-4), row
        assert row["frac_of_copy"] == pytest.approx(row["gb_s"] / copy, rel=1e-4), row


def test_without_cuda_only_the_rehearsal_runs(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--tiny" in r.stderr
    assert not (tmp_path / "x.json").exists()


def _preset_yaml(name):
    """configs/<name>.yaml with its ``extends`` chain merged (later files override)."""
    doc = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    base = doc.pop("extends", None)
    if base is None:
        return doc

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(_preset_yaml(base), doc)


@pytest.mark.parametrize("preset", sorted(kt.PRESETS))
def test_preset_table_matches_configs(preset):
    unet = _preset_yaml(preset)["model"]["unet"]
    table = kt.PRESETS[preset]
    for key in ("base_channel", "channel_multiplier", "num_residual_blocks_of_a_block", "attention_resolutions"):
        want = unet[key]
        assert (tuple(want) if isinstance(want, list) else want) == table[key], key
    assert str(table["res"]) in preset  # the image size is in the preset's name


@pytest.mark.parametrize("preset", ["shapes32", "celeba64"])
def test_norm_shapes_match_the_shift_unet(preset, monkeypatch):
    """Every GroupNorm input of a real ShiftUNet forward (frozen DDPM and shift branch), recorded
    at the norm's call site, against the enumeration (the preset's structure at 32 base channels,
    to stay fast: the structure does not depend on the width)."""
    from diti_fast.config import UNetConfig
    import diti_fast.nn.blocks as blocks
    import diti_fast.nn.unet as unet

    seen = set()
    real = blocks.norm_act

    def spy(gn, x, *args, **kwargs):
        seen.add((x.shape[1], math.prod(x.shape[2:])))  # attention norms see [B, C, H·W]
        return real(gn, x, *args, **kwargs)

    monkeypatch.setattr(blocks, "norm_act", spy)
    monkeypatch.setattr(unet, "norm_act", spy)
    p = dict(kt.PRESETS[preset])
    res = p.pop("res")
    p["base_channel"] = 32  # the smallest width with 32 groups
    model = unet.ShiftUNet(UNetConfig(**p, latent_dim=8, dropout=0.0))
    with torch.no_grad():
        model(torch.randn(1, 3, res, res), torch.tensor([5]), torch.randn(1, 8))
    assert seen == {(c, r * r) for c, r in kt.unet_norm_shapes(res, **p)}
