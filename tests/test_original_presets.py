"""Every DiTi/PDAE config of the original as a preset, the lr rules, PDAE sampling without masks, the
training-time visuals, and the regression protocol's preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from diti_fast.config import ConfigError
from diti_fast.engine.loop import train
from diti_fast.engine.config_files import apply_overrides, build_config, load_config
from diti_fast.engine.resume_rules import resume_conflicts

# Facts of the original's config files (config/<folder>/<file>.yml): pdae_mode (or pdae.yml), balanced
# (no stages), max_images, global batch, lr.
ORIGINAL = {
    "celeba64_diti64": ("base", False, 38_000_000, 128, 1e-4),
    "celeba64_diti64_balanced": ("base", True, 38_000_000, 128, 1e-4),
    "celeba64_diti64_balanced_stopgrad": ("stop_grad", True, 38_000_000, 128, 1e-4),
    "celeba64_diti64_stopgrad": ("stop_grad", False, 60_000_000, 128, 1e-4),
    "celeba64_pdae": ("pdae", False, 38_000_000, 128, 2e-4),
    "ffhq_diti64": ("base", False, 64_000_000, 128, 1e-4),
    "ffhq_diti64_balanced_stopgrad": ("stop_grad", True, 64_000_000, 128, 1e-4),
    "ffhq_pdae": ("pdae", False, 64_000_000, 256, 2e-4),
    "bedroom128_diti64": ("base", False, 70_000_000, 128, 1e-4),
    "bedroom128_diti64_balanced_stopgrad": ("stop_grad", True, 70_000_000, 128, 1e-4),
    "bedroom128_pdae": ("pdae", False, 70_000_000, 128, 5e-5),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_original_config_presets(name):
    mode, balanced, images, batch, lr = ORIGINAL[name]
    c = load_config(name)
    assert (c.diti.mode, c.run.max_images, c.data.batch_size, c.optim.lr) == (mode, images, batch, lr)
    assert c.model.masks.k == 64 and (c.model.masks.stages is None) == balanced
    if not balanced:
        assert c.model.masks.dims_per_stage == (10, 25, 327, 100, 50)
    size = {"celeba64": 64, "ffhq": 128, "bedroom128": 128}[name.split("_")[0]]
    assert c.image_size() == size
    # PDAE: the raw lr whatever the number of GPUs (the original's PDAE trainer has no batch rule).
    if mode == "pdae":
        assert c.lr(1) == c.lr(4) == c.lr(8) == lr


def test_lr_rules_with_4_and_8_gpus():
    # The paper: lr 1e-4 for a global batch of 128 (4 GPUs x 32 in the original code's per-GPU rule).
    c = load_config("celeba64")
    assert c.lr_rule() == "global"
    assert (c.lr(1), c.lr(4), c.lr(8)) == (pytest.approx(1e-4),) * 3
    o = load_config("celeba64_original")
    assert o.lr_rule() == "per_gpu"
    assert (o.lr(4), o.lr(8)) == (pytest.approx(1e-4), pytest.approx(5e-5))  # the original halves it on 8
    assert load_config("celeba64", ["optim.lr_rule=none", "data.batch_size=256"]).lr(8) == 1e-4
    assert load_config("celeba64", ["data.batch_size=256"]).lr(8) == pytest.approx(2e-4)
    assert load_config("celeba64_pdae", ["optim.lr_rule=per_gpu"]).lr(8) == pytest.approx(2e-4 * 16 / 32)


@pytest.mark.parametrize("override", ["optim.scale_lr_by_batch=false", "optim.scale_lr_by_batch=true",
                                      "optim.lr_rule=auto"])
def test_removed_lr_switches_are_refused_naming_lr_rule(override):
    with pytest.raises(ConfigError, match=r"optim\.lr_rule") as e:
        load_config("celeba64", [override])
    assert "removed" in str(e.value)


def test_print_config_with_8_ranks_shows_the_papers_lr(monkeypatch, capsys):
    import yaml
    from diti_fast.engine.loop import main
    monkeypatch.setenv("WORLD_SIZE", "8")
    for preset, rule, lr in (("celeba64", "global", 1e-4), ("celeba64_original", "per_gpu", 5e-5)):
        assert main(["--config", preset, "--print-config"]) == 0
        out = yaml.safe_load(capsys.readouterr().out)
        assert out["effective"] == {"world_size": 8, "lr_rule": rule, "lr": pytest.approx(lr), "micro_batch": 16}
        assert out["run"]["dir"] == f"runs/{preset}-diti"
        # The printed config loads back as it was (the effective section is derived, not read).
        assert build_config(out).lr(8) == pytest.approx(lr)


def test_configs_saved_before_lr_rule_resume():
    # Configs saved by earlier versions: scale_lr_by_batch, or lr_rule 'auto' (per_gpu, none for pdae).
    cur = {"stage": "diti", "diti": {"mode": "base"}, "optim": {"lr_rule": "none"}}
    old = {"stage": "diti", "diti": {"mode": "base"}, "optim": {"scale_lr_by_batch": False}}
    assert resume_conflicts(old, cur) == []
    assert resume_conflicts({**old, "optim": {"scale_lr_by_batch": True}}, cur) == \
        ["optim.lr_rule: 'per_gpu' -> 'none'"]
    assert resume_conflicts({**old, "optim": {"lr_rule": "auto"}}, {**cur, "optim": {"lr_rule": "global"}}) == \
        ["optim.lr_rule: 'per_gpu' -> 'global'"]


def test_pdae_exports_sample_without_masks():
    from diti_fast.config import EncoderConfig, MaskConfig, ModelConfig, UNetConfig
    from diti_fast.diffusion import make_schedule
    from diti_fast.eval.counterfactual import Sampler
    from diti_fast.nn import build_decoder, build_encoder
    from diti_fast.sampling import masked_ddim
    from diti_fast.weights import Exported
    cfg = ModelConfig(unet=UNetConfig(base_channel=32, channel_multiplier=(1,), num_residual_blocks_of_a_block=1,
                                      attention_resolutions=(), latent_dim=64),
                      masks=MaskConfig(k=8), encoder=EncoderConfig(name="shapes32", latent_dim=64))
    torch.manual_seed(0)
    dec = build_decoder(cfg)
    for p in dec.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    ex = Exported("diti", cfg, {"diti": {"mode": "pdae"}}, encoder=build_encoder(cfg).eval(), decoder=dec.eval())
    s = Sampler(ex)
    assert s.masks is None and len(s.end_dims) == 8
    x_T, z = torch.randn(1, 3, 16, 16), torch.randn(1, 64)
    torch.testing.assert_close(s.decode(x_T, z, 2), masked_ddim(dec, x_T, z, make_schedule(cfg.diffusion), None, 2))
    ex.config = {"diti": {"mode": "base"}}
    assert Sampler(ex).masks is not None


TINY = {
    "model": {"unet": {"base_channel": 32, "channel_multiplier": [1, 2], "num_residual_blocks_of_a_block": 1,
                       "attention_resolutions": [2], "dropout": 0.0, "latent_dim": 64},
              "masks": {"k": 8}, "encoder": {"name": "shapes32", "latent_dim": 64}},
    "run": {"threads": 1},
    "data": {"source": "fixed", "batch_size": 2, "num_workers": 0},
    "optim": {"lr_rule": "none"},
    "log": {"every": 1, "progress": False, "tensorboard": False, "visuals_every": 1, "visuals_num": 2,
            "visuals_steps": 2},
    "checkpoint": {"every": 0},
}


def test_training_time_visuals(tmp_path):
    cfg = build_config(apply_overrides(TINY, [f"run.dir={tmp_path}/ddpm", "stage=ddpm", "data.image_size=16",
                                              "run.max_images=4"]), "test")
    train(cfg)
    ddpm = sorted(p.name for p in (tmp_path / "ddpm" / "visuals").iterdir())
    assert ddpm == ["step-00000001.png", "step-00000002.png"]
    cfg = build_config(apply_overrides(TINY, [f"run.dir={tmp_path}/diti", f"init.ddpm={tmp_path}/ddpm",
                                              "run.max_images=2"]), "test")
    train(cfg)
    img = Image.open(tmp_path / "diti" / "visuals" / "step-00000001.png")
    assert img.format == "PNG" and img.height > 3 * 64  # rows: input, reconstruction, z from fixed noise
    with pytest.raises(Exception, match="visuals_steps"):
        build_config(apply_overrides(TINY, ["log.visuals_steps=0", "stage=ddpm"]), "test")


def test_resize_then_center_crop_closed_form():
    from data_shards.images import resize_then_center_crop
    # A 100x140 (w x h) image: shorter side -> 70, longer int(70 * 140 / 100) = 98 (torchvision's Resize),
    # then the 64x64 crop at left round(6 / 2) = 3, top round(34 / 2) = 17 (torchvision's CenterCrop).
    a = np.random.default_rng(0).integers(0, 256, (140, 100, 3), dtype=np.uint8)
    out = resize_then_center_crop(Image.fromarray(a), 64, "nearest")
    assert out.shape == (64, 64, 3)
    resized = np.asarray(Image.fromarray(a).resize((70, 98), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out, resized[17:81, 3:67])
