"""Training config, presets, overrides, noise keys and the EMA: fast, no process group."""
from __future__ import annotations

import math

import pytest
import torch

from diti_fast.engine import noise
from diti_fast.config import ConfigError
from diti_fast.engine.ema import EMA
from diti_fast.engine.loop import main
from diti_fast.engine.config_files import PRESETS, apply_overrides, build_config, load_config
from diti_fast.engine.resume_rules import resume_conflicts
from diti_fast.engine.run_config import validate_runtime


def test_presets_load_and_hold_the_original_hyper_parameters():
    for name in PRESETS:
        load_config(name)
    c = load_config("celeba64")
    assert (c.stage, c.data.batch_size, c.run.max_images) == ("diti", 128, 38_000_000)
    assert c.model.masks.stages == (50, 100, 300, 500, 1000)
    assert c.model.masks.dims_per_stage == (10, 25, 327, 100, 50)
    assert (c.optim.lr, tuple(c.optim.betas), c.optim.eps, c.optim.weight_decay) == (1e-4, (0.9, 0.999), 1e-8, 0.0)
    assert c.ema.decay == 0.9999 and c.ema.every == 1
    assert c.lr(world_size=4) == c.lr(world_size=1) == pytest.approx(1e-4)  # the paper's lr, any rank count
    assert c.total_steps() == math.ceil(38_000_000 / 128)
    o = load_config("celeba64_original")
    assert (o.run.precision, o.fast.attention, o.fast.compile, o.fast.fused_norm, o.fast.fused_loss) == \
        ("fp32", "math", False, False, False)
    assert o.model == c.model
    f, b = load_config("ffhq128"), load_config("bedroom128")
    assert f.model.unet.channel_multiplier == (1, 1, 2, 3, 4) and f.model.unet.base_channel == 128
    assert (f.run.max_images, b.run.max_images) == (64_000_000, 70_000_000)
    assert (f.model.encoder.name, b.model.encoder.name) == ("ffhq128", "bedroom128")
    s = load_config("shapes32")
    assert s.model.encoder.name == "shapes32" and s.fast.compile is False


def test_overrides_are_typed_dotted_and_validated():
    c = load_config("shapes32", ["stage=ddpm", "optim.lr=3e-4", "optim.betas=[0.5,0.9]", "log.progress=false",
                                 "debug.nan_at_steps=[2,3]", "model.masks.stages=100,1000",
                                 "model.masks.dims_per_stage=500,12"])
    assert c.stage == "ddpm" and c.optim.lr == 3e-4 and c.optim.betas == (0.5, 0.9)
    assert c.log.progress is False and c.debug.nan_at_steps == [2, 3] and c.model.masks.stages == (100, 1000)


@pytest.mark.parametrize("overrides, field", [
    (["optim.lrr=1"], "optim: unknown key(s) 'lrr'"),
    (["bogus=1"], "unknown key(s) 'bogus'"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["data.batch_size=1.5"], "data.batch_size: expected an integer"),
    (["log.progress=maybe"], "log.progress: expected true/false"),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage=3"),
    (["data.batch_size=30", "deepspeed.grad_accum=4"], "data.batch_size=30 is not divisible by deepspeed.grad_accum=4"),
    (["init.ddpm="], "init.ddpm is empty"),
    (["data.source=shards", "data.shards="], "data.shards is empty"),
    (["data.image_size=64"], "data.image_size=64"),
    (["model.unet.base_channel=48"], "model.unet.base_channel"),
    (["model.masks.dims_per_stage=1,2,3,4,5"], "model.masks.dims_per_stage sums to 15"),
    (["run.max_images=10"], "run.max_images=10"),
    (["run.max_images=38.5e0"], "run.max_images: expected an integer"),
    (["run.max_images=lots"], "run.max_images: expected an integer, got 'lots'"),
    (["fast.attention=flash"], "fast.attention"),
    (["fast.compile=true", "fast.compile_mode=reduce-overhead"], "fast.compile_mode"),
    (["optim.lr"], "expected key=value"),
    (["stage.x=1"], "stage is not a section"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("shapes32", overrides)
    assert field in str(e.value)


def test_integers_in_exponent_form():
    # YAML reads 38e6 (no dot) as a string; 38.0e6 and 38000000 are numbers. All three mean the same.
    for v in ("38e6", "38.0e6", "38000000", "3.8E+7"):
        c = load_config("celeba64", [f"run.max_images={v}"])
        assert c.run.max_images == 38_000_000 and type(c.run.max_images) is int


def test_train_help_names_every_preset(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in PRESETS:
        assert name in out, name
    assert len(PRESETS) >= 16


def test_runtime_checks_name_the_fields():
    c = load_config("shapes32", ["data.batch_size=12", "deepspeed.grad_accum=2"])
    validate_runtime(c, world_size=2, device_type="cpu")  # 12 = 2 ranks x 2 accum x 3
    with pytest.raises(ConfigError, match=r"data.batch_size=12 .* 4 x deepspeed.grad_accum=2"):
        validate_runtime(c, world_size=4, device_type="cpu")
    x = load_config("shapes32", ["fast.attention=xformers"])
    with pytest.raises(ConfigError, match="fast.attention='xformers'"):
        validate_runtime(x, world_size=1, device_type="cpu")


@pytest.mark.parametrize("graph", ["fast.cuda_graph=true", "run.device=cuda"])
def test_max_autotune_is_refused_with_the_step_graph(graph):
    # max-autotune's own CUDA graphs would be captured inside the whole-step graph.
    base = ["init.ddpm=x", "data.shards=d", "fast.compile=true", "fast.compile_mode=max-autotune"]
    with pytest.raises(ConfigError) as e:
        build_config(apply_overrides({}, base + [graph]))
    msg = str(e.value)
    assert "fast.compile_mode='max-autotune'" in msg and "fast.cuda_graph=" in msg
    assert "max-autotune-no-cudagraphs" in msg and "CUDA graphs" in msg


def test_max_autotune_with_cuda_graph_auto_is_decided_at_launch():
    base = ["init.ddpm=x", "data.shards=d", "fast.compile=true", "fast.compile_mode=max-autotune"]
    auto = build_config(apply_overrides({}, base))  # run.device auto: only the launch knows the device
    validate_runtime(auto, world_size=1, device_type="cpu")
    with pytest.raises(ConfigError, match=r"fast\.compile_mode='max-autotune'.*fast\.cuda_graph=auto on CUDA"):
        validate_runtime(auto, world_size=1, device_type="cuda")
    # what stays allowed: no graph, the no-cudagraphs mode, max-autotune without compile
    for ok in (["fast.cuda_graph=false", "run.device=cuda"], ["fast.compile_mode=max-autotune-no-cudagraphs",
               "fast.cuda_graph=true"], ["fast.compile=false", "fast.cuda_graph=true"]):
        validate_runtime(build_config(apply_overrides({}, base + ok)), world_size=1, device_type="cuda")


def test_extends_merges_sections(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: shapes32\noptim:\n  lr: 5.0e-4\n")
    c = load_config(f)
    assert c.optim.lr == 5e-4 and c.optim.betas == (0.9, 0.999) and c.model.encoder.name == "shapes32"
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="not a preset name"):
        load_config("no_such_preset")


def test_resume_conflicts_ignore_length_and_logging_but_not_the_maths():
    a = build_config(apply_overrides({}, ["init.ddpm=x", "data.shards=d"]))
    from diti_fast.engine.config_files import resolved_dict
    b = build_config(apply_overrides({}, ["init.ddpm=x", "data.shards=d", "run.max_images=1000000",
                                          "log.every=7", "checkpoint.every=3"]))
    assert resume_conflicts(resolved_dict(a), resolved_dict(b)) == []
    c = build_config(apply_overrides({}, ["init.ddpm=x", "data.shards=d", "optim.lr=1e-3"]))
    assert any(k.startswith("optim.lr") for k in resume_conflicts(resolved_dict(a), resolved_dict(c)))


def test_cli_reports_config_errors_before_any_work(capsys, tmp_path):
    assert main(["--config", "shapes32", "optim.lr=abc"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["--config", "shapes32", f"data.shards={missing}", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "data.shards=" in err and "manifest" in err
    assert not (tmp_path / "run").exists()
    assert main(["--config", "shapes32", "data.source=fixed", f"init.ddpm={missing}",
                 f"run.dir={tmp_path / 'run'}"]) == 2
    assert "init.ddpm=" in capsys.readouterr().err
    assert main(["--config", "shapes32", "--print-config"]) == 0
    assert "encoder:" in capsys.readouterr().out


# --------------------------------------------------------------------------- noise keyed by global index

def test_noise_depends_only_on_seed_and_global_index():
    idx = torch.arange(100, 164)
    t, eps = noise.draw(7, idx, (3, 8, 8), 1000)
    # Any split (ranks, accumulation micro-batches) of the same indices gives the same draws.
    for parts in (2, 4, 64):
        pieces = [noise.draw(7, chunk, (3, 8, 8), 1000) for chunk in idx.chunk(parts)]
        assert torch.equal(torch.cat([p[0] for p in pieces]), t)
        assert torch.equal(torch.cat([p[1] for p in pieces]), eps)
    t2, eps2 = noise.draw(8, idx, (3, 8, 8), 1000)
    assert not torch.equal(eps, eps2) and not torch.equal(t, t2)
    big = torch.tensor([2 ** 33 + 5, 5])  # 64-bit indices: the high word is part of the key
    assert not torch.equal(noise.gaussian(0, big[:1], (4,)), noise.gaussian(0, big[1:], (4,)))


def test_noise_statistics():
    t, eps = noise.draw(0, torch.arange(2000), (3, 16, 16), 1000)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    counts = torch.bincount(t // 100, minlength=10).float()
    assert ((counts - 200).abs() < 60).all()  # ~4 sigma
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
    assert abs((eps ** 4).mean().item() - 3) < 0.05  # Gaussian kurtosis
    # Samples are uncorrelated: for independent 768-dim vectors E[r^2] = 1/767.
    c = torch.corrcoef(eps.flatten(1)[:200])
    r2 = (c - torch.eye(200))[~torch.eye(200, dtype=torch.bool)] ** 2
    assert abs(r2.mean().item() * 767 - 1) < 0.1
    # ... and so are neighbouring elements inside one sample.
    flat = eps.flatten(1)
    assert abs(torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]) < 0.01


# --------------------------------------------------------------------------- EMA

def test_ema_matches_the_reference_update_and_masks_skipped_steps():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ema = EMA([("a", ps[0]), ("b", ps[1])], decay=0.9)
    ref = [p.detach().clone() for p in ps]
    for _ in range(3):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn_like(p))
        ema.update()
        ref = [r.mul(0.9).add(p.detach(), alpha=0.1) for r, p in zip(ref, ps)]
    for r, s in zip(ref, ema.shadow):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
    before = [s.clone() for s in ema.shadow]
    ema.update(torch.tensor(0.1) * torch.tensor(False))  # a skipped step: weight 0
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"a": ps[0].detach()})
