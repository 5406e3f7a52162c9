"""End to end through the command line: synthetic shards -> ddpm stage (crash, resume) -> diti stage.

Runs ``python diti_fast/train.py`` as a script (the way the launchers start it) and the
``diti-fast`` console entry, on a tiny model so the whole file takes well under a minute.
"""
from __future__ import annotations

import json
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


@pytest.mark.slow
def test_ddpm_then_diti_on_synthetic_shards(tmp_path):
    from data_shards.synthetic import make_synthetic_shards
    shards = tmp_path / "data"
    make_synthetic_shards(shards, 24, image_size=32, seed=0, maxcount=12)
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

    entry = [sys.executable, "-c", "import sys; from diti_fast.cli import main; sys.exit(main())"]
    out = _run(entry + ["train", "--config", str(cfg), f"run.dir={diti}", f"data.shards={shards}",
                        f"init.ddpm={ddpm}", "run.max_images=12", "diti.mode=stop_grad"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen DDPM from" in out.stdout

    from diti_fast.weights import load_export
    d, u = load_export(diti), load_export(ddpm)
    assert (d.stage, u.stage) == ("diti", "ddpm")
    assert d.config["diti"]["mode"] == "stop_grad" and d.config["data"]["image_size"] == 32
    # The DiTi export carries the frozen DDPM it was trained on, unchanged.
    frozen = {k: v for k, v in d.decoder.state_dict().items() if k in u.unet.state_dict()}
    assert frozen and all((v == u.unet.state_dict()[k]).all() for k, v in frozen.items())
    import torch
    x = torch.zeros(2, 3, 32, 32)
    assert d.encoder(x).shape == (2, 64)
