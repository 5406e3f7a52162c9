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
from diti_fast.engine.config_files import apply_overrides, build_config
from helpers import spy_on_kernels, tree_diff

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
    "optim": {"lr": 1e-3, "lr_rule": "none"},
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


def _ddpm_loss_by_hand(unet, seed: int, batch: int, size: int) -> float:
    """The ε-loss of ``unet`` on the fixed source's first batch, written out here: x0 in [-1, 1], t and
    ε of the samples 0..batch-1, x_t from the linear schedule's cumulative alphas."""
    import numpy as np
    from diti_fast.engine import noise
    from diti_fast.engine.microbatches import fixed_batch
    cfg = tiny(Path("unused"), "stage=ddpm", f"run.seed={seed}", f"data.batch_size={batch}")
    x0 = fixed_batch(cfg, size).float() / 127.5 - 1
    t, eps = noise.draw(seed, torch.arange(batch), (3, size, size), 1000)
    alpha_bar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)), dtype=torch.float32)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = unet.eval()(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)
    return float(((eps - pred) ** 2).mean())


@pytest.mark.parametrize("source", ["export", "original"])
def test_ddpm_finetuning_starts_from_the_given_weights(tmp_path, ddpm_export, source):
    from diti_fast.weights import load_export, load_weights, split_prefixed
    start = load_export(ddpm_export).unet
    init = ddpm_export
    if source == "original":  # the original's checkpoint layout: {"ema_denoise_fn": state dict, ...}
        init = tmp_path / "checkpoint.pt"
        torch.save({"ema_denoise_fn": split_prefixed(load_weights(ddpm_export)[0], "unet"),
                    "denoise_fn": {}}, init)
    expected = _ddpm_loss_by_hand(start, 3, 4, 16)
    common = ("stage=ddpm", "data.image_size=16", "run.max_images=4")
    train(tiny(tmp_path / "ft", *common, f"init.ddpm={init}", "init.finetune=true"))
    first = metrics(tmp_path / "ft")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
    # The run's config records the learning rate it trained with, and its rule.
    import yaml
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["effective"] == {"world_size": 1, "lr_rule": "none", "lr": first["lr"], "micro_batch": 4}
    assert first["lr"] == 1e-3 and saved["init"]["finetune"] is True
    # A fresh model on the same batch: another loss (so the check above can tell the two apart).
    train(tiny(tmp_path / "fresh", *common, f"init.ddpm={init}"))
    assert metrics(tmp_path / "fresh")[0]["loss"] != pytest.approx(expected, rel=1e-3)


def test_ddpm_finetuning_config_errors(tmp_path, ddpm_export):
    from diti_fast.config import ConfigError
    with pytest.raises(ConfigError, match="init.finetune=true applies to stage 'ddpm'"):
        tiny(tmp_path, f"init.ddpm={ddpm_export}", "init.finetune=true")
    with pytest.raises(ConfigError, match="init.ddpm is empty"):
        tiny(tmp_path, "stage=ddpm", "init.finetune=true")
    with pytest.raises(ConfigError, match="no such file"):
        train(tiny(tmp_path, "stage=ddpm", "data.image_size=16", "run.max_images=4",
                   f"init.ddpm={tmp_path / 'absent.pt'}", "init.finetune=true"))
    assert not (tmp_path / "metrics.jsonl").exists()


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


# ----------------------------------------------------------------------------- exit status, stops, refusals

DDPM16 = ["stage=ddpm", "data.image_size=16"]


def _main(tmp_path: Path, run_dir: Path, *overrides: str) -> int:
    """The command line's entry point (what diti_fast/train.py exits with), on a YAML of TINY."""
    import yaml
    from diti_fast.engine.loop import main
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "preset": "tiny"}))
    return main(["--config", str(config), f"run.dir={run_dir}", *overrides])


def _status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def test_a_signal_stops_with_exit_status_75_after_a_checkpoint_and_the_same_command_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    # SIGTERM to itself after step 2 of 10
    assert _main(tmp_path, run, *DDPM16, "run.max_images=40", "debug.signal_at_step=2") == 75
    st = _status(run)
    assert (st["status"], st["reason"], st["step"], st["exit_code"]) == ("stopped", "signal", 2, 75)
    assert [s for s, _ in ckpt.checkpoint_dirs(run / "checkpoints")] == [2]
    assert not (run / "export").exists()  # a signal's grace period is short: no export
    assert "signal received" in capsys.readouterr().out
    assert _main(tmp_path, run, *DDPM16, "run.max_images=40") == 0
    assert (_status(run)["status"], _status(run)["exit_code"]) == ("done", 0)
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))


def test_the_nonfinite_guard_exits_with_status_3(tmp_path, capsys):
    run = tmp_path / "run"
    rc = _main(tmp_path, run, *DDPM16, "run.max_images=40", "debug.nan_at_steps=[2,3,4]",
               "guard.max_consecutive_nonfinite=2")
    assert rc == 3
    assert "guard.max_consecutive_nonfinite=2" in capsys.readouterr().err
    assert _status(run)["status"] == "failed" and _steps_logged(run) == 3


class _FakeClock:
    """time.monotonic for the loop and its stop check, advanced only by the debug sleep after each step
    (engine/faults.py), so a run's wall clock is exactly ``steps x debug.step_sleep_s`` whatever the
    machine's load."""

    def __init__(self, monkeypatch):
        import time as real
        from diti_fast.engine import faults, loop, stopping
        self.now = 1000.0
        fake = type("FakeTime", (), {})()
        for name in ("perf_counter", "time", "strftime", "localtime"):
            setattr(fake, name, getattr(real, name))
        fake.monotonic = lambda: self.now
        fake.sleep = self.sleep
        monkeypatch.setattr(loop, "time", fake)
        monkeypatch.setattr(stopping, "time", fake)
        monkeypatch.setattr(faults, "time", fake)

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_time_limit_is_in_minutes_and_stops_with_status_75_checkpoint_and_export(tmp_path, monkeypatch):
    _FakeClock(monkeypatch)
    run = tmp_path / "run"
    # 0.5 minutes = 30 s at 7 s per step: past the limit after step 5 (35 s), of 10
    assert _main(tmp_path, run, *DDPM16, "run.max_images=40", "run.time_limit_minutes=0.5",
                 "debug.step_sleep_s=7") == 75
    st = _status(run)
    assert (st["status"], st["reason"], st["step"], st["exit_code"]) == ("stopped", "time_limit", 5, 75)
    assert [s for s, _ in ckpt.checkpoint_dirs(run / "checkpoints")] == [5]
    assert (run / "export" / "ema.safetensors").is_file()  # a time limit also exports
    # resumed with a limit that is not reached: to the end
    assert _main(tmp_path, run, *DDPM16, "run.max_images=40", "run.time_limit_minutes=10",
                 "debug.step_sleep_s=7") == 0
    assert _status(run)["status"] == "done" and _steps_logged(run) == 10


def test_resume_false_over_existing_checkpoints_is_refused_and_touches_nothing(tmp_path, capsys):
    from diti_fast.config import ConfigError
    run = tmp_path / "run"
    assert train(tiny(run, *DDPM16, "run.max_images=8", "checkpoint.every=1")).step == 2
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "status.json"}
    with pytest.raises(ConfigError, match="already holds checkpoints .*checkpoint.resume=false"):
        train(tiny(run, *DDPM16, "run.max_images=16", "checkpoint.resume=false"))
    capsys.readouterr()
    assert _main(tmp_path, run, *DDPM16, "run.max_images=16", "checkpoint.resume=false") == 2
    assert "checkpoint.resume=false" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "status.json"}
    assert after == before  # no checkpoint, metric, config or export written or removed
    # the same command with resume on continues the run
    assert train(tiny(run, *DDPM16, "run.max_images=16")).step == 4


def _steps_logged(run_dir: Path) -> int:
    return max((m["step"] for m in metrics(run_dir)), default=0)


def test_a_frozen_ddpm_of_another_architecture_is_refused_before_any_work(tmp_path, ddpm_export):
    from diti_fast.config import ConfigError
    cfg = tiny(tmp_path, f"init.ddpm={ddpm_export.parent.parent}", "model.unet.channel_multiplier=[1,2,2]")
    with pytest.raises(ConfigError, match=r"model.unet.channel_multiplier: export has \[1, 2\], config has"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()


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
        diffs = tree_diff(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True))
        assert diffs == [], f"{name} differs at {diffs[:5]}"
    # The logged losses after the resume are those of the uninterrupted run, too.
    after = lambda recs: [(r["step"], r["loss"]) for r in recs if r["step"] > 5]  # noqa: E731
    assert after(metrics(full)) == after(metrics(cut)) and len(after(metrics(cut))) == 3


# ----------------------------------------------------------------------------- NaN skip is exact

def _state(run_dir: Path, step: int) -> dict:
    """Module, EMA and optimiser state of a checkpoint (the data position and RNG left out)."""
    d = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    model = torch.load(d / "model.pt", weights_only=True)
    return {"module": model["module"], "ema": model["ema"],
            "optimizer": torch.load(d / "rank-00000.pt", weights_only=True)["optimizer"]}


def test_a_nan_step_leaves_module_ema_and_optimizer_bitwise_as_the_step_before(tmp_path):
    # ZeRO-2 (partitioned fp32 master copy and Adam moments): a 2-step run whose step 2 is NaN ends
    # exactly where a 1-step run ends, torch.equal on every tensor.
    common = ["stage=ddpm", "data.image_size=16", "deepspeed.zero_stage=2"]
    assert train(tiny(tmp_path / "one", *common, "run.max_images=4")).step == 1
    assert train(tiny(tmp_path / "two", *common, "run.max_images=8", "debug.nan_at_steps=[2]")).step == 2
    assert [r["nonfinite_steps"] for r in metrics(tmp_path / "two")] == [0, 1]
    one, two = _state(tmp_path / "one", 1), _state(tmp_path / "two", 2)
    diffs = tree_diff(one, two)
    assert diffs == [], f"the skipped step changed {diffs[:5]}"
    # ... and the comparison can see a step: without the NaN, step 2 moves all three.
    assert train(tiny(tmp_path / "ref", *common, "run.max_images=8")).step == 2
    moved = {p.split(".")[1] for p in tree_diff(one, _state(tmp_path / "ref", 2))}
    assert {"module", "ema", "optimizer"} <= moved, moved


# ----------------------------------------------------------------------------- speed switches

# Each switch against the plain fp32 run of the same config (same init, same t/ε, same batches): the
# loss at step 1 (before any update) and the loss curve of the following steps, and the final
# weights. Stated tolerances: fp32 switches (fused kernels, compile) change only the rounding, so
# step 1 agrees to 1e-5 relative and later steps to 1e-3 (Adam turns rounding-level gradient
# differences into up to lr-sized steps on near-zero gradients); bf16 autocast rounds activations to
# 8 bits, so 3e-2 relative on every step. compile runs on the smallest UNet (ddpm stage, one level,
# 8 px): a cold Inductor compile of the DiTi models costs minutes on a 2-core CPU.
DITI = ["diti.mode=dual", "run.max_images=12", "run.precision=fp32"]
# Interpreted Triton pays per program and op: the fused run keeps to base mode and 2 steps.
DITI_SHORT = ["diti.mode=base", "run.max_images=8", "run.precision=fp32"]
DDPM_SMALL = ["stage=ddpm", "data.image_size=8", "model.unet.channel_multiplier=[1]",
              "model.unet.attention_resolutions=[]", "run.max_images=12", "run.precision=fp32"]
SWITCHES = {
    "fused": (DITI_SHORT, ["fast.fused_norm=true", "fast.fused_loss=true"], 1e-5, 1e-3),
    "bf16": (DITI, ["run.precision=bf16"], 3e-2, 3e-2),
    "compile": (DDPM_SMALL, ["fast.compile=true"], 1e-5, 1e-3),
}


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, ddpm_export):
    """The plain fp32 run of each base config, trained once per module."""
    cache = {}

    def get(base):
        key = tuple(base)
        if key not in cache:
            run = tmp_path_factory.mktemp("plain")
            assert train(tiny(run, *_with_ddpm(base, ddpm_export))).status == "done"
            cache[key] = run
        return cache[key]
    return get


def _with_ddpm(base, ddpm_export):
    return base if "stage=ddpm" in base else [f"init.ddpm={ddpm_export}", *base]


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_speed_switches_train_like_the_plain_fp32_run(switch, tmp_path, ddpm_export, plain_runs, monkeypatch):
    """``compile`` is slow (a cold Inductor compile, ~50 s on 2 cores): only it trains the engine under
    torch.compile and checks Inductor compiled the step without graph breaks."""
    base, overrides, first_tol, later_tol = SWITCHES[switch]
    plain = plain_runs(base)
    launches = []
    if switch == "fused":  # the kernels must really run (interpreted Triton on CPU)
        import diti_fast.kernels.fused_loss as fl
        import diti_fast.kernels.fused_norm as fn
        launches = spy_on_kernels(monkeypatch, {fl: ["_partial_kernel"], fn: ["_agn_fwd_kernel", "_agn_bwd_kernel"]})
    if switch == "compile":
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
    assert train(tiny(tmp_path, *_with_ddpm(base, ddpm_export), *overrides)).status == "done"
    if switch == "fused":
        assert {"_partial_kernel", "_agn_fwd_kernel", "_agn_bwd_kernel"} <= set(launches), set(launches)
    if switch == "compile":  # Inductor compiled the graph, without graph breaks
        assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] > 0, \
            dict(counters["inductor"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    ref, got = metrics(plain), metrics(tmp_path)
    steps = len(ref)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, steps + 1)) and steps >= 2
    for r, g in zip(ref, got):
        tol = first_tol if r["step"] == 1 else later_tol
        assert abs(g["loss"] - r["loss"]) <= tol * abs(r["loss"]), (switch, r["step"], g["loss"], r["loss"])
    a, b = _state(plain, steps)["module"], _state(tmp_path, steps)["module"]
    if "stage=ddpm" not in base:
        shift = "decoder.shift_out.2.weight"
        assert not torch.equal(a[shift], torch.zeros_like(a[shift]))  # the shift branch moved
    for k in a:  # two runs' Adam updates differ by at most ~2·lr per step (lr 1e-3)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2 * steps * 1e-3, msg=k)
