"""The engine in one process (DeepSpeed on the CPU accelerator): learning, NaN guard, exact resume.

Tiny models (32 channels, 16-32 px, batch 4-8) and one thread, so the runs are a few seconds and
bit-reproducible.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diti_fast.engine import checkpoints as ckpt
from diti_fast.engine.loop import NonFiniteLoss, train
from diti_fast.engine.run_config import apply_overrides, build_config

TINY = {
    "model": {
        "unet": {"base_channel": 32, "channel_multiplier": [1, 2], "num_residual_blocks_of_a_block": 1,
                 "attention_resolutions": [2], "num_heads": 1, "dropout": 0.0, "latent_dim": 64},
        "masks": {"k": 8},
        "encoder": {"name": "shapes32", "latent_dim": 64},
    },
    "run": {"threads": 1, "seed": 3},
    "data": {"source": "fixed", "batch_size": 4, "num_workers": 0, "hflip": True},
    "fast": {"attention": "sdpa"},
    "optim": {"lr": 1e-3, "scale_lr_by_batch": False},
    "ema": {"decay": 0.9},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 0, "keep": 3},
}


def tiny(run_dir: Path, *overrides: str):
    return build_config(apply_overrides(TINY, [f"run.dir={run_dir}", *overrides]), "test")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddpm_export(tmp_path_factory) -> Path:
    """A tiny frozen DDPM (32 px) exported by the engine's own ddpm stage."""
    run = tmp_path_factory.mktemp("ddpm")
    # The UNet is convolutional: trained at 16 px (cheaper), it serves as the frozen DDPM at 32 px.
    res = train(tiny(run, "stage=ddpm", "data.image_size=16", "run.max_images=8"))
    assert res.status == "done" and res.export == run / "export" / "ema.safetensors"
    return res.export


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from data_shards.synthetic import make_synthetic_shards
    out = tmp_path_factory.mktemp("shards")
    make_synthetic_shards(out, 16, image_size=32, seed=0, maxcount=8)
    return out


def _window_means(run_dir, n):
    losses = [m["loss"] for m in metrics(run_dir)]
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def test_a_few_steps_on_a_fixed_batch_lower_the_ddpm_loss(tmp_path):
    train(tiny(tmp_path, "stage=ddpm", "data.image_size=16", "data.batch_size=8", "run.max_images=240"))
    first, last = _window_means(tmp_path, 5)
    assert last < 0.8 * first, (first, last)


def test_a_few_steps_on_a_fixed_batch_lower_the_diti_loss(tmp_path, ddpm_export):
    train(tiny(tmp_path, f"init.ddpm={ddpm_export}", "run.max_images=120", "optim.lr=2e-3"))
    first, last = _window_means(tmp_path, 5)
    assert last < 0.8 * first, (first, last)
    from diti_fast.weights import load_export
    ex = load_export(tmp_path)
    assert ex.stage == "diti" and ex.encoder is not None and ex.config["diti"]["mode"] == "base"


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    # ZeRO-2 (DeepSpeed's partitioned optimiser) with its own norm check off: the engine's
    # device-side flag must skip the update. Step 2 is NaN on the only rank.
    res = train(tiny(tmp_path, "stage=ddpm", "data.image_size=16", "run.max_images=16",
                     "deepspeed.zero_stage=2", "debug.nan_at_steps=[2]", "checkpoint.every=1"))
    assert res.status == "done" and res.step == 4
    recs = metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in recs] == [0, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in recs if r["step"] != 2)
    assert recs[1]["samples"] == 0  # the NaN step's samples are not averaged into the loss
    # The skipped step moved nothing: Adam's step count is 3 after 4 steps, and step 2's
    # checkpoint was not written (mid-streak) while 1, 3, 4 were (keep=3).
    names = [p.name for _, p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")]
    assert names == ["step-00000001", "step-00000003", "step-00000004"]
    opt = torch.load(tmp_path / "checkpoints/step-00000004/rank-00000.pt", weights_only=True)["optimizer"]
    steps = {float(s["step"]) for s in opt["base_optimizer_state"]["state"].values()}
    assert steps == {3.0}
    m1 = torch.load(tmp_path / "checkpoints/step-00000001/model.pt", weights_only=True)
    m3 = torch.load(tmp_path / "checkpoints/step-00000003/model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in m3["module"].values())
    assert any(not torch.equal(m1["module"][k], m3["module"][k]) for k in m1["module"])


def test_a_run_of_nonfinite_losses_stops_keeping_the_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "stage=ddpm", "data.image_size=16", "run.max_images=40",
               "debug.nan_at_steps=[3,4,5,6,7,8]", "guard.max_consecutive_nonfinite=3", "checkpoint.every=2")
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    msg = str(e.value)
    assert "3 consecutive steps" in msg and "guard.max_consecutive_nonfinite=3" in msg
    assert "step-00000002" in msg
    names = [p.name for _, p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")]
    assert names == ["step-00000002"]  # step 4 fell inside the streak: not written
    good = torch.load(tmp_path / "checkpoints/step-00000002/model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["module"].values())
    assert not (tmp_path / "export").exists()


def test_a_frozen_ddpm_of_another_architecture_is_refused_before_any_work(tmp_path, ddpm_export):
    from diti_fast.config import ConfigError
    cfg = tiny(tmp_path, f"init.ddpm={ddpm_export.parent.parent}", "model.unet.channel_multiplier=[1,2,2]")
    with pytest.raises(ConfigError, match=r"model.unet.channel_multiplier: export has \[1, 2\], config has"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()


def _tree_equal(a, b, path="") -> list[str]:
    """Paths where two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in _tree_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path + " (len)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tree_equal(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_killed_by_a_signal_and_resumed_is_bit_identical(tmp_path, ddpm_export, shards):
    # DiTi on shards (hflip, 2 epochs of 8 micro-batches), ZeRO-2, accumulation 2, dropout on:
    # the resume must restore weights, EMA, Adam moments, the dropout RNG and the data position.
    common = [f"init.ddpm={ddpm_export}", "data.source=shards", f"data.shards={shards}",
              "model.unet.dropout=0.1", "deepspeed.zero_stage=2", "deepspeed.grad_accum=2",
              "run.max_images=32", "data.shuffle_buffer=8", "ema.warmup=true", "data.num_workers=1"]
    full = tmp_path / "full"
    assert train(tiny(full, *common)).status == "done"

    cut = tmp_path / "cut"
    first = train(tiny(cut, *common, "debug.signal_at_step=5"))  # SIGTERM to itself after step 5
    assert first.status == "signal" and first.step == 5
    assert [s for s, _ in ckpt.checkpoint_dirs(cut / "checkpoints")] == [5]
    data_pos = torch.load(cut / "checkpoints/step-00000005/rank-00000.pt", weights_only=True)["data"]
    assert data_pos == {"epoch": 1, "batch": 2}  # 10 micro-batches = one epoch of 8, then 2
    second = train(tiny(cut, *common))
    assert second.status == "done" and second.step == 8

    a, b = full / "checkpoints/step-00000008", cut / "checkpoints/step-00000008"
    for name in ("model.pt", "rank-00000.pt"):
        diffs = _tree_equal(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True))
        assert diffs == [], f"{name} differs at {diffs[:5]}"
    # The logged losses after the resume are those of the uninterrupted run, too.
    after = lambda recs: [(r["step"], r["loss"]) for r in recs if r["step"] > 5]  # noqa: E731
    assert after(metrics(full)) == after(metrics(cut)) and len(after(metrics(cut))) == 3
