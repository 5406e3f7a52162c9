"""End to end on a tiny random-weight run: the CLI commands, the report, and clean errors for run
directories with missing or incompatible weights."""
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diti_fast.weights import join_prefixed, save_weights
from diti_fast.config import EncoderConfig, MaskConfig, ModelConfig, UNetConfig, to_dict
from diti_fast.eval.commands import main
from diti_fast.eval.features import cached_features, load_run
from diti_fast.eval.report import ReportSettings, write_report
from diti_fast.eval.probe import ProbeConfig
from diti_fast.weights import export_path, save_export
from diti_fast.nn import build_decoder, build_encoder, build_unet
from data_shards import synthetic  # first-party: an ImportError must fail the tests, not skip them

# Batches of 2-16 tiny 32 px images: on a 2-core runner intra-op threads cost more than they give.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(base: int = 32) -> ModelConfig:
    return ModelConfig(unet=UNetConfig(base_channel=base, channel_multiplier=(1, 2), num_residual_blocks_of_a_block=1,
                                       attention_resolutions=(2,)),
                       masks=MaskConfig(k=64, stages=(50, 100, 300, 500, 1000), dims_per_stage=(10, 25, 327, 100, 50)),
                       encoder=EncoderConfig(name="shapes32"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc, dec = build_encoder(cfg), build_decoder(cfg)
    for p in dec.trainable_parameters():  # a nonzero shift branch, so z actually steers the sampler
        torch.nn.init.normal_(p, std=0.02)
    save_export(export_path(root / "run"), "diti", cfg, {"seed": 0}, encoder=enc, decoder=dec)
    save_export(export_path(root / "ddpm"), "ddpm", cfg, {"data": {"image_size": 32}}, unet=build_unet(cfg))
    synthetic.make_synthetic_shards(root / "shards", 150, image_size=32, seed=0, maxcount=64)
    return root


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("diti-fast: error:")
    for n in needles:
        assert n in err, err
    return err


def test_missing_export_is_a_clear_error(env, tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    _fails(["probe", "--run", str(tmp_path / "empty_run"), "--data", str(env / "shards")], capsys,
           str(export_path(tmp_path / "empty_run")))
    _fails(["reconstruct", "--run", str(tmp_path / "nope"), "--data", str(env / "shards")], capsys, "does not exist")


def test_incompatible_weights_name_the_keys(env, tmp_path, capsys):
    # Weights of a base-32 model under the metadata of a base-64 one: every conv is mis-shaped.
    small = tiny_cfg(32)
    tensors = join_prefixed(encoder=build_encoder(small).state_dict(), decoder=build_decoder(small).state_dict())
    export_path(tmp_path / "bad").parent.mkdir(parents=True)
    save_weights(export_path(tmp_path / "bad"), tensors, {"stage": "diti", "model": to_dict(tiny_cfg(64))})
    err = _fails(["counterfactual", "--run", str(tmp_path / "bad"), "--data", str(env / "shards")], capsys,
                 "does not fit the model", "mis-shaped keys")
    assert "[decoder]" in err and "checkpoint (64, 128) vs model (128, 256)" in err
    # A file that lost the decoder: missing keys are named.
    export_path(tmp_path / "half").parent.mkdir(parents=True)
    save_weights(export_path(tmp_path / "half"), join_prefixed(encoder=build_encoder(small).state_dict()),
                 {"stage": "diti", "model": to_dict(small)})
    _fails(["probe", "--run", str(tmp_path / "half"), "--data", str(env / "shards")], capsys, "missing keys")


def test_ddpm_export_is_refused_for_representation_commands(env, capsys):
    _fails(["probe", "--run", str(env / "ddpm"), "--data", str(env / "shards")], capsys, "'ddpm' export")


def test_wrong_image_size_is_a_clear_error(env, tmp_path, capsys):
    synthetic.make_synthetic_shards(tmp_path / "s16", 8, image_size=16, maxcount=8)
    _fails(["probe", "--run", str(env / "run"), "--data", str(tmp_path / "s16"), "--max-samples", "8"], capsys,
           "16x16", "32x32")


def test_module_entry_point_exit_code(env, tmp_path):
    r = subprocess.run([sys.executable, "-m", "diti_fast.eval", "probe", "--run", str(tmp_path), "--data",
                        str(env / "shards")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "export" in r.stderr


def test_features_are_cached_and_split_deterministically(env):
    ex = load_run(env / "run")
    a = cached_features(env / "run", env / "shards", ex.encoder, max_samples=100, log=lambda m: None)
    assert a.z.shape == (100, 512) and a.attrs.shape == (100, 9)
    assert len(list((env / "run" / "eval" / "features").glob("*.npz"))) >= 1
    b = cached_features(env / "run", env / "shards", None, max_samples=100, log=lambda m: pytest.fail("re-extracted"))
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_array_equal(a.position, np.arange(100))


def test_counterfactual_grid_png(env, tmp_path, capsys):
    out = tmp_path / "cf.png"
    main(["counterfactual", "--run", str(env / "run"), "--data", str(env / "shards"), "--pair", "3,7",
          "--loc", "0,32", "--width", "4,32", "--alphas", "0,0.5,1", "--steps", "2", "--invert-steps", "2",
          "--out", str(out)])
    img = Image.open(out)
    assert img.format == "PNG"
    # 32 px images are drawn at 64 px; 4 rows (2 ranges x mirror), 3 columns, title and header bands.
    cell, pad = 64, 2
    assert img.size[1] == 2 * (13 + 2 * pad) + 4 * cell + 5 * pad
    assert img.size[0] > 3 * cell + 4 * pad


def test_interpolate_reconstruct_and_sample(env, tmp_path, monkeypatch):
    """The commands write PNG grids of what the method says they show: an interpolation's ends are A's
    and B's reconstructions (α = 0: A's z and x_T; α = 1: B's), the reconstruction metrics are those of
    the drawn images, and sampling is seeded."""
    from diti_fast import grids
    from diti_fast.eval import commands
    shown = {}
    real_save = grids.save_grid

    def spy(path, images, *args, **kwargs):  # the image tensors each command draws, by output name
        shown[Path(path).stem] = images.detach().clone()
        return real_save(path, images, *args, **kwargs)
    monkeypatch.setattr(commands, "save_grid", spy)
    main(["counterfactual", "--run", str(env / "run"), "--data", str(env / "shards"), "--loc", "4", "--width", "8",
          "--fixed-noise", "--no-mirror", "--steps", "2", "--invert-steps", "2", "--out", str(tmp_path / "f.png")])
    main(["interpolate", "--run", str(env / "run"), "--data", str(env / "shards"), "--num", "3", "--steps", "2",
          "--invert-steps", "2", "--out", str(tmp_path / "i.png")])
    main(["reconstruct", "--run", str(env / "run"), "--data", str(env / "shards"), "--indices", "0,1",
          "--steps", "2", "--invert-steps", "2", "--out", str(tmp_path / "r.png")])
    main(["sample", "--run", str(env / "ddpm"), "--num", "3", "--steps", "2", "--out", str(tmp_path / "s.png")])
    main(["sample", "--run", str(env / "run"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s2.png")])
    for name in ("f", "i", "r", "s", "s2"):
        assert Image.open(tmp_path / f"{name}.png").format == "PNG"
    interp, recon = shown["i"], shown["r"]
    assert interp.shape[:2] == (1, 3) and recon.shape[:2] == (3, 2)  # α = 0, 0.5, 1; input/recon/fresh x #0, #1
    # the interpolation (pair 0,1, all chunks) at α = 0 and 1 against reconstruct's images 0 and 1; the
    # decodes run in batches of other sizes, hence float32 rounding and not bit equality
    torch.testing.assert_close(interp[0, 0], recon[1, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(interp[0, 2], recon[1, 1], rtol=0, atol=1e-4)
    assert (interp[0, 1] - interp[0, 0]).abs().max() > 1e-3  # the middle is neither end
    # r.json: per-image MSE in [0, 1] units of the drawn reconstruction against the drawn input
    q = json.loads((tmp_path / "r.json").read_text())
    mse01 = (((recon[1].clamp(-1, 1) - recon[0].clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    assert q["indices"] == [0, 1] and q["mse_01"] == pytest.approx(mse01.tolist(), rel=1e-5)
    # 3 DDPM samples in a 2 x 2 grid, the fourth cell blank (white); the same seed, the same samples
    s = shown["s"]
    assert s.shape[:2] == (2, 2) and bool((s[1, 1] == 1).all()) and not bool((s[0, 0] == s[0, 1]).all())
    main(["sample", "--run", str(env / "ddpm"), "--num", "3", "--steps", "2", "--out", str(tmp_path / "s3.png")])
    assert torch.equal(shown["s3"], s)
    assert shown["s2"].shape[:2] == (1, 2)


def test_report_on_random_weights(env):
    s = ReportSettings(max_samples=150, probe=ProbeConfig(epochs=2, standardize=True), steps=2, invert_steps=2,
                       n_recon=2, n_samples=2, manip_num=2, manip_scales=(-1.0, 1.0))
    md = write_report(env / "run", env / "shards", "cpu", s, log=lambda m: None)
    out = md.parent
    for f in ("report.md", "report.json", "chunks_heatmap.png", "counterfactuals.png",
              "counterfactuals_fixed_noise.png", "reconstructions.png", "ddpm_samples.png"):
        assert (out / f).is_file(), f
    text = md.read_text()
    assert "80/10/10" in text and "standardised" in text and "2 inversion and 2 reverse steps" in text
    # The manipulation grid: the synthetic set has no binary attribute, so the first categorical one.
    assert "## Attribute manipulation" in text and "(manipulate_shape=circle.png)" in text
    assert (out / "manipulate_shape=circle.png").is_file()
    numbers = json.loads((out / "report.json").read_text())  # strict JSON: NaN became null
    assert [g["dim_hi"] for g in numbers["chunks"]["groups"]] == [10, 35, 362, 462, 512]
    assert set(numbers["fine_vs_coarse"]) >= {"fine", "coarse"}
    assert numbers["sizes"] == {"train": 120, "val": 15, "test": 15}
    assert numbers["manipulation"]["attribute"] == "shape" and len(numbers["manipulation"]["positions"]) == 2


def test_counterfactual_cells_are_the_algebra_decoded(env):
    """Grid cells equal decodes of the hand-built (x_T, z): α = 0 is A's reconstruction; on the full range
    α = 1 is B's z with B's x_T (slerp) or with A's x_T (fixed noise)."""
    from diti_fast.eval.counterfactual import Sampler, counterfactuals
    from diti_fast.eval.features import load_images
    sampler = Sampler(load_run(env / "run"))
    x = load_images(env / "shards", [5, 11])
    steps = 2
    z = sampler.encode(x)
    xT = sampler.invert(x, z, steps)
    ref = sampler.decode(torch.cat([xT[:1], xT[1:], xT[:1]]), torch.cat([z[:1], z[1:], z[1:]]), steps)
    for slerp_noise, want_at_1 in ((True, ref[1]), (False, ref[2])):
        imgs, _ = counterfactuals(sampler, x[:1], x[1:], [(0, 64)], (0.0, 1.0), steps, steps, mirror=False,
                                  slerp_noise=slerp_noise)
        torch.testing.assert_close(imgs[0, 0], ref[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(imgs[0, 1], want_at_1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("command, shown", [
    ("probe", ["--epochs EPOCHS default: 15", "--lr LR default: 0.001", "--seed SEED default: 0",
               "--batch-size BATCH_SIZE probe batch (default: 128)"]),
    ("manipulate", ["sparsity mask (0 = all) (default: 16)", "--epochs EPOCHS default: 10",
                    "--invert-steps INVERT_STEPS inversion steps (the original: 1000) (default: 1000)"]),
    ("sample", ["--steps STEPS default: 100", "--num NUM default: 16"]),
])
def test_eval_help_shows_the_defaults(command, shown, capsys):
    from diti_fast.cli import main as cli_main
    argv = ["eval", command, "--help"] if command != "sample" else ["sample", "--help"]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    out = " ".join(capsys.readouterr().out.split())  # whatever the terminal width
    assert e.value.code == 0
    for text in shown:
        assert text in out, (text, out)
