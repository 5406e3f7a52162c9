"""Two ranks under ZeRO-2 (torchrun, DeepSpeed's CPU accelerator) end where one process ends, and a
NaN on one rank only is skipped on both.

The global batch is the same fixed batch in both runs; t and ε are keyed by the global sample
index, so the only difference is how the gradient is summed (per rank, then all-reduced): the
final weights and EMA agree to float rounding. Dropout is off (it draws from per-rank generators).

The UNet has 64 base channels, i.e. two channels per GroupNorm group. With one channel per group,
the biases that feed a GroupNorm have an identically zero true gradient (the norm removes a
per-channel constant); Adam turns the rounding noise of such a gradient into full ±lr steps, so two
runs that merely sum in a different order (even one process with another accumulation split)
drift apart by ~lr on those biases. That is Adam, not the engine; the test avoids it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diti_fast.engine.loop import train
from helpers import tree_diff
from diti_fast.engine.config_files import apply_overrides, build_config

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "stage": "diti",
    "model": {
        "unet": {"base_channel": 64, "channel_multiplier": [1, 2], "num_residual_blocks_of_a_block": 1,
                 "attention_resolutions": [2], "num_heads": 1, "dropout": 0.0, "latent_dim": 64},
        "masks": {"k": 8},
        "encoder": {"name": "shapes32", "latent_dim": 64},
    },
    "run": {"threads": 1, "seed": 11, "max_images": 24},
    "data": {"source": "fixed", "batch_size": 8},
    "diti": {"mode": "dual"},
    "optim": {"lr": 1e-3, "lr_rule": "none"},   # the original's rule would differ by world size
    "deepspeed": {"zero_stage": 2, "grad_accum": 2},
    "ema": {"decay": 0.5},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 0},
}


@pytest.mark.slow
def test_two_rank_zero2_equals_one_process_on_the_combined_batch(tmp_path):
    """Slow (torchrun, 2 ranks). Only this test compares 2 ranks with one process on the combined
    batch (ZeRO-2, accumulation, dual mode) and a NaN on one rank skipped on both."""
    ddpm = tmp_path / "ddpm"
    train(build_config(apply_overrides(CONFIG, ["stage=ddpm", f"run.dir={ddpm}", "data.image_size=16",
                                                "deepspeed.zero_stage=0", "deepspeed.grad_accum=1"]), "test"))
    cfg = dict(CONFIG, init={"ddpm": str(ddpm)})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))

    # Step 3 is NaN on rank 1 only: rank 0's loss is finite, yet both ranks must skip the update
    # (the all-reduced flag), so the final state is bitwise the state after step 2.
    two = tmp_path / "two"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # --standalone: torchrun picks its rendezvous port itself and hands it to the ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "diti_fast" / "train.py"), "--config", str(path), f"run.dir={two}",
           "debug.nan_at_steps=[3]", "debug.nan_rank=1", "checkpoint.every=1"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "ranks=2" in proc.stdout and "micro 2 x accum 2 x 2" in proc.stdout
    before, after = (two / f"checkpoints/step-0000000{s}" for s in (2, 3))
    for name in ("model.pt", "rank-00000.pt", "rank-00001.pt"):
        a_, b_ = (torch.load(d / name, weights_only=True) for d in (before, after))
        for part in (("module", "ema") if name == "model.pt" else ("optimizer",)):
            diffs = tree_diff(a_[part], b_[part])
            assert diffs == [], f"{name} [{part}] changed by the skipped step: {diffs[:5]}"
        if name != "model.pt":
            steps = {float(v["step"]) for v in b_["optimizer"]["base_optimizer_state"]["state"].values()}
            assert steps == {2.0}, (name, steps)

    one = tmp_path / "one"
    train(build_config(apply_overrides(cfg, [f"run.dir={one}", "debug.nan_at_steps=[3]"]), "test"))

    a = torch.load(one / "checkpoints/step-00000003/model.pt", weights_only=True)
    b = torch.load(two / "checkpoints/step-00000003/model.pt", weights_only=True)
    assert set(a["module"]) == set(b["module"]) and set(a["ema"]) == set(b["ema"])
    from diti_fast.weights import load_weights
    init, _ = load_weights(ddpm / "export" / "ema.safetensors")  # the frozen DDPM: the EMA export
    for part in ("module", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=1e-5, msg=f"{part}.{k}")
    # The frozen DDPM inside the decoder is untouched; the trainable part moved.
    frozen = {k: v for k, v in a["module"].items() if k.startswith("decoder.") and "unet." + k[8:] in init}
    assert frozen and all(torch.equal(v, init["unet." + k[8:]]) for k, v in frozen.items())
    assert not torch.equal(a["module"]["decoder.shift_out.2.weight"], torch.zeros_like(a["module"]["decoder.shift_out.2.weight"]))
    # Both ranks wrote their partition of the optimiser state, loadable weights-only.
    for r in (0, 1):
        state = torch.load(two / f"checkpoints/step-00000003/rank-{r:05d}.pt", weights_only=True)
        assert state["data"] == {"epoch": 0, "batch": 0} and "base_optimizer_state" in state["optimizer"]
