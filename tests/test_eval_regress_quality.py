"""The original's regression protocol (eval regress) and the reconstruction metrics of eval reconstruct."""
import json
import math

import numpy as np
import pytest
import torch

from diti_fast.eval.features import EvalError, FeatureSet
from diti_fast.eval.quality import reconstruction_quality
from diti_fast.eval.regress import RegressConfig, continuous_columns, regress

ATTRS = [{"name": "a", "kind": "continuous"}, {"name": "b", "kind": "continuous"},
         {"name": "c", "kind": "categorical", "num_classes": 3}]


def _set(n, seed, w):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.c_[z @ w + 0.3, rng.normal(size=n) * 0.3, rng.integers(0, 3, n)].astype(np.float32)
    return FeatureSet(z, y, np.arange(n), ATTRS, "mem")


def test_protocol_defaults_are_the_originals():
    assert (RegressConfig().epochs, RegressConfig().batch_size, RegressConfig().lr) == (15, 64, 1e-3)


def test_regression_on_raw_targets():
    w = np.linspace(-0.2, 0.2, 8)
    res = regress(_set(1500, 0, w), _set(300, 1, w), RegressConfig())
    assert res.attributes == ["a", "b"] and len(res.epochs) == 15 and (res.n_train, res.n_test) == (1500, 300)
    final = res.final
    # a is linear in z (var 0.11, offset 0.3 in raw units: no target standardisation), b is noise.
    assert final["pearson_r"][0] > 0.95 and abs(final["pearson_r"][1]) < 0.2
    assert final["mse"][0] < 0.02  # raw units, offset included (predicting the mean scores 0.11)
    assert res.best_epoch == int(np.nanargmax([e["mean_pearson_r"] for e in res.epochs]))
    assert final["mean_pearson_r"] == pytest.approx(np.mean(final["pearson_r"]))


def test_regression_picks_and_refuses_attributes():
    assert continuous_columns(ATTRS, None) == [0, 1] and continuous_columns(ATTRS, ["b"]) == [1]
    with pytest.raises(EvalError, match="not continuous|are not"):
        continuous_columns(ATTRS, ["c"])
    with pytest.raises(EvalError, match="not in the manifest"):
        continuous_columns(ATTRS, ["zz"])
    with pytest.raises(EvalError, match="no continuous attribute"):
        continuous_columns(ATTRS[2:], None)


def test_reconstruction_quality_closed_forms():
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    same = reconstruction_quality(x, x)
    assert same["mean_mse_01"] == 0 and same["mean_ssim"] == pytest.approx(1.0) and math.isinf(same["psnr_db"][0])
    shifted = reconstruction_quality(x, x + 0.2)  # +0.1 in [0, 1] units everywhere (no clipping: |x| <= .8)
    assert shifted["mse_01"] == pytest.approx([0.01, 0.01])
    assert shifted["mean_psnr_db"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert shifted["mean_mse_pm1"] == pytest.approx(0.04)
    assert 0 < shifted["mean_ssim"] < 1


def test_regress_and_reconstruct_commands(tmp_path):
    """Through the CLI on a tiny random export: regress writes every epoch, reconstruct writes the metrics."""
    from data_shards.synthetic import make_synthetic_shards
    from diti_fast.config import EncoderConfig, MaskConfig, ModelConfig, UNetConfig
    from diti_fast.eval.commands import main
    from diti_fast.nn import build_decoder, build_encoder
    from diti_fast.weights import export_path, save_export
    cfg = ModelConfig(unet=UNetConfig(base_channel=32, channel_multiplier=(1,), num_residual_blocks_of_a_block=1,
                                      attention_resolutions=(), latent_dim=64),
                      masks=MaskConfig(k=8), encoder=EncoderConfig(name="shapes32", latent_dim=64))
    torch.manual_seed(0)
    save_export(export_path(tmp_path / "run"), "diti", cfg, {}, encoder=build_encoder(cfg), decoder=build_decoder(cfg))
    make_synthetic_shards(tmp_path / "shards", 60, image_size=32, seed=0, maxcount=60)
    main(["regress", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "shards"), "--epochs", "2",
          "--attrs", "size,speckle"])
    out = json.loads((tmp_path / "run" / "eval" / "regress.json").read_text())
    assert out["attributes"] == ["size", "speckle"] and len(out["epochs"]) == 2 and out["n_test"] == 6
    main(["reconstruct", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "shards"), "--indices", "0,1",
          "--steps", "1", "--invert-steps", "1"])
    rec = json.loads((tmp_path / "run" / "eval" / "reconstruction.json").read_text())
    assert len(rec["ssim"]) == 2 and rec["mean_mse_pm1"] == pytest.approx(4 * rec["mean_mse_01"])
    assert rec["mean_psnr_db"] == pytest.approx(np.mean([10 * np.log10(1 / m) for m in rec["mse_01"]]))
