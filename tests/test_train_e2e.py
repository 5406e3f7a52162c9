"""End to end through the real commands: ``python -m data_shards make`` (synthetic shards) ->
``python diti_fast/train.py`` stage ddpm (crash, resume) -> the installed ``diti-fast`` console script
for the diti stage -> ``diti-fast eval report``, on a tiny model.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "extends": "shapes32",
    "model": {"unet": {"channel_multiplier": [1, 2], "attention_resolutions": [2], "latent_dim": 64},
              "masks": {"k": 8, "stages": None, "dims_per_stage": None},
              "encoder": {"latent_dim": 64}},
    "run": {"threads": 1},
    "data": {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 16},
    "optim": {"lr": 1e-3},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 2, "keep": 2},
}


def _run(args, cwd):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _console_script() -> str:
    # The console script pip installed beside this interpreter (pyproject's [project.scripts]); not
    # finding it is a packaging failure, not a reason to skip.
    path = Path(sys.executable).parent / "diti-fast"
    assert path.is_file(), f"{path} is missing: the package's console script is not installed"
    return str(path)


@pytest.mark.slow
def test_ddpm_then_diti_on_synthetic_shards_then_report(tmp_path):
    """Slow (several fresh processes). Only this test runs the user's commands as installed: the
    data CLI, the train script as a file, a crash (exit 99) and resume, the ``diti-fast`` console
    script and ``eval report``, one after the other on the same files."""
    import torch
    shards = tmp_path / "data"
    made = _run([sys.executable, "-m", "data_shards", "make", "--source", "synthetic", "--num", "64",
                 "--size", "32", "--maxcount", "16", "--seed", "0", "--no-progress", "--out", str(shards)], tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.loads((shards / "manifest.json").read_text())["num_samples"] == 64
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, extends=str(REPO / "configs" / "shapes32.yaml"))))
    ddpm, diti = tmp_path / "ddpm", tmp_path / "diti"
    script = [sys.executable, str(REPO / "diti_fast" / "train.py"), "--config", str(cfg)]
    ddpm_args = script + ["stage=ddpm", f"run.dir={ddpm}", f"data.shards={shards}", "run.max_images=24"]

    crashed = _run(ddpm_args + ["debug.crash_at_step=3"], tmp_path)  # dies after step 3, no checkpoint
    assert crashed.returncode == 99, crashed.stderr[-3000:]
    assert sorted(p.name for p in (ddpm / "checkpoints").iterdir()) == ["step-00000002"]
    assert (ddpm / "config.yaml").is_file() and not (ddpm / "export").exists()

    resumed = _run(ddpm_args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000002" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (ddpm / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # step 3 was redone after the crash
    saved = yaml.safe_load((ddpm / "config.yaml").read_text())
    assert saved["stage"] == "ddpm" and saved["data"]["image_size"] == 32

    out = _run([_console_script(), "train", "--config", str(cfg), f"run.dir={diti}", f"data.shards={shards}",
                f"init.ddpm={ddpm}", "run.max_images=48", "optim.lr=2e-3", "ema.decay=0.5",
                "diti.mode=stop_grad"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen DDPM from" in out.stdout
    losses = [json.loads(line)["loss"] for line in (diti / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), losses

    from diti_fast.weights import load_export
    d, u = load_export(diti), load_export(ddpm)
    assert (d.stage, u.stage) == ("diti", "ddpm")
    assert d.config["diti"]["mode"] == "stop_grad" and d.config["data"]["image_size"] == 32
    # The DiTi export carries the frozen DDPM it was trained on, unchanged.
    frozen = {k: v for k, v in d.decoder.state_dict().items() if k in u.unet.state_dict()}
    assert frozen and all((v == u.unet.state_dict()[k]).all() for k, v in frozen.items())
    # The shift branch (zero at init) moved, and it lowers DiTi's loss: the trained encoder and decoder
    # on fixed images, t and ε against the same models with the shift output zeroed (= the loss at
    # init, where G = 0 whatever the encoder gives).
    shift = d.decoder.state_dict()["shift_out.2.weight"]
    assert shift.abs().max() > 0
    assert _diti_loss_on_fixed_batch(d, shards) < 0.95 * _diti_loss_on_fixed_batch(d, shards, zero_shift=True)

    report = _run([_console_script(), "eval", "report", "--run", str(diti), "--data", str(shards),
                   "--max-samples", "64", "--epochs", "2", "--steps", "2", "--invert-steps", "2",
                   "--device", "cpu"], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    numbers = json.loads((diti / "report" / "report.json").read_text())
    assert numbers["sizes"]["train"] + numbers["sizes"]["val"] + numbers["sizes"]["test"] == 64
    assert (diti / "report" / "report.md").is_file()
    assert d.encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def _diti_loss_on_fixed_batch(export, shards, zero_shift=False) -> float:
    """DiTi's base loss of an export's encoder and decoder on 16 fixed images, t spread over [0, T), ε
    from a fixed seed; optionally with the shift output layer zeroed (its state at init)."""
    import copy
    import torch
    from diti_fast.diffusion import make_schedule
    from diti_fast.eval.features import load_images
    from diti_fast.losses import diti_objective
    from diti_fast.masks import TimestepMasks
    mc = export.model_cfg
    decoder = copy.deepcopy(export.decoder).eval()
    if zero_shift:
        with torch.no_grad():
            decoder.shift_out[2].weight.zero_()
            decoder.shift_out[2].bias.zero_()
    x0 = load_images(shards, list(range(16)))
    t = torch.arange(16) * (mc.diffusion.timesteps // 16) + 30
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    masks = TimestepMasks.build(mc.masks, mc.unet.latent_dim, mc.diffusion.timesteps)
    with torch.no_grad():
        return float(diti_objective(export.encoder.eval(), decoder, x0, t, noise, make_schedule(mc.diffusion),
                                    masks, "base").loss)
