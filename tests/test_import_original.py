"""import-original: runs and DDPMs of the original code (its checkpoint layout, ``_orig_mod.`` keys of its
--compile runs, its config.yml files) become this project's exports and evaluate exactly as the export
made directly from the same weights."""
import json

import pytest
import torch
import yaml

from data_shards import synthetic
from diti_fast.config import ConfigError, to_dict
from diti_fast.engine.objective import check_init_ddpm
from diti_fast.engine.config_files import load_config
from diti_fast.eval.commands import main as eval_main
from diti_fast.eval.features import cached_features
from diti_fast.import_original import import_original, main as import_main
from diti_fast.nn import build_decoder, build_encoder, build_unet
from diti_fast.weights import (CheckpointError, export_path, load_original_run, load_weights, save_export,
                               strip_compile_prefix)


TINY = {"extends": "shapes32",
        "model": {"unet": {"channel_multiplier": [1, 2], "attention_resolutions": [2], "latent_dim": 64},
                  "masks": {"k": 8, "stages": None, "dims_per_stage": None}, "encoder": {"latent_dim": 64}}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 32 px batches: intra-op threads cost more than they give on a 2-core runner."""
    from diti_fast.eval.probe import _single_thread
    with _single_thread(torch.device("cpu")):
        yield


def _compiled(sd):
    return {"_orig_mod." + k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(root / "tiny.yaml", [f"init.ddpm={root}/ddpm/checkpoint.pt"])
    torch.manual_seed(0)
    enc, dec = build_encoder(cfg.model), build_decoder(cfg.model)
    for p in dec.trainable_parameters():  # a nonzero shift branch, so z steers the sampler
        torch.nn.init.normal_(p, std=0.02)
    # The direct export, and the same weights in the original's layout: RUN/checkpoints/latest.pt with
    # encoder/decoder/ema_* state dicts (the EMA ones as --compile saves them), RUN/config.yml.
    save_export(export_path(root / "direct"), "diti", cfg.model, {"diti": {"mode": "base"}}, encoder=enc, decoder=dec)
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"encoder": {k: torch.zeros_like(v) for k, v in enc.state_dict().items()},
                "decoder": {k: torch.zeros_like(v) for k, v in dec.state_dict().items()},
                "ema_encoder": _compiled(enc.state_dict()), "ema_decoder": _compiled(dec.state_dict()), "step": 7},
               root / "run" / "checkpoints" / "latest.pt")
    unet = to_dict(cfg.model.unet)
    (root / "run" / "config.yml").write_text(yaml.safe_dump({
        "diffusion_config": to_dict(cfg.model.diffusion), "encoder_config": {"model": "shapes32", "latent_dim": 64},
        "ssl_config": {"k": 8, "ssl_weight": 0.0}}))
    (root / "ddpm").mkdir()
    ddpm_cfg = {"denoise_fn_config": {"model": "UNet", **{k: v for k, v in unet.items() if k != "latent_dim"}},
                "diffusion_config": to_dict(cfg.model.diffusion)}
    (root / "ddpm" / "config.yml").write_text(yaml.safe_dump(ddpm_cfg))
    torch.manual_seed(1)
    plain = build_unet(cfg.model)
    torch.save({"ema_denoise_fn": _compiled(plain.state_dict()), "denoise_fn": plain.state_dict()},
               root / "ddpm" / "checkpoint.pt")
    save_export(export_path(root / "ddpm_direct"), "ddpm", cfg.model, {"data": {"image_size": 32}}, unet=plain)
    synthetic.make_synthetic_shards(root / "shards", 40, image_size=32, seed=0, maxcount=40)
    return root


def test_strip_compile_prefix():
    t = torch.zeros(1)
    assert strip_compile_prefix({"_orig_mod.a.b": t, "c": t, "_orig_mod._orig_mod.d": t}).keys() == {"a.b", "c", "d"}
    with pytest.raises(CheckpointError, match="both with and without"):
        strip_compile_prefix({"_orig_mod.a": t, "a": t})


def test_load_original_run_strips_orig_mod(env):
    cfg = load_config(env / "tiny.yaml", [f"init.ddpm={env}/ddpm/checkpoint.pt"])
    enc, dec = build_encoder(cfg.model), build_decoder(cfg.model)
    load_original_run(enc, dec, env / "run" / "checkpoints" / "latest.pt")
    direct, _ = load_weights(export_path(env / "direct"))
    assert all(torch.equal(v, direct["encoder." + k]) for k, v in enc.state_dict().items())


def test_original_run_imports_and_evaluates_identically(env, capsys):
    out = env / "imported"
    assert import_main([str(env / "run" / "checkpoints" / "latest.pt"), "--config", str(env / "tiny.yaml"),
                        "--ddpm-config", str(env / "ddpm" / "config.yml"), "--out", str(out),
                        f"init.ddpm={env}/ddpm/checkpoint.pt"]) == 0
    a, meta = load_weights(export_path(out))
    b, _ = load_weights(export_path(env / "direct"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["stage"] == "diti" and meta["imported_from"]["run_config"].endswith("config.yml")
    fa = cached_features(out, env / "shards", log=lambda m: None)
    fb = cached_features(env / "direct", env / "shards", log=lambda m: None)
    assert torch.equal(torch.from_numpy(fa.z), torch.from_numpy(fb.z))
    res = []
    for run in (out, env / "direct"):
        eval_main(["reconstruct", "--run", str(run), "--data", str(env / "shards"), "--indices", "0,1",
                   "--steps", "2", "--invert-steps", "2"])
        res.append(json.loads((run / "eval" / "reconstruction.json").read_text()))
    assert res[0] == res[1]


def test_original_ddpm_imports_with_its_config_checked(env):
    out = import_original(env / "ddpm" / "checkpoint.pt", env / "ddpm_imported", str(env / "tiny.yaml"),
                          log=lambda m: None)
    a, meta = load_weights(out)
    b, _ = load_weights(export_path(env / "ddpm_direct"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["stage"] == "ddpm" and meta["data"]["image_size"] == 32
    assert meta["imported_from"]["ddpm_config"].endswith("config.yml")  # found beside the checkpoint


def test_config_disagreements_name_the_field(env, tmp_path, capsys):
    bad = yaml.safe_load((env / "ddpm" / "config.yml").read_text())
    bad["denoise_fn_config"]["num_heads"] = 4  # invisible in the weights' shapes
    (tmp_path / "ddpm.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"model\.unet\.num_heads: preset has 1, .*num_heads has 4"):
        import_original(env / "ddpm" / "checkpoint.pt", tmp_path / "x", str(env / "tiny.yaml"),
                        ddpm_config=tmp_path / "ddpm.yml", log=lambda m: None)
    run_cfg = yaml.safe_load((env / "run" / "config.yml").read_text())
    run_cfg["ssl_config"]["pdae_mode"] = "stop_grad"
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run_cfg))
    rc = import_main([str(env / "run" / "checkpoints" / "latest.pt"), "--config", str(env / "tiny.yaml"),
                      "--run-config", str(tmp_path / "run.yml"), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "diti.mode: preset has 'base'" in err and "'stop_grad'" in err
    assert not export_path(tmp_path / "y").exists()
    # The training path reads the same file beside an original DDPM given as init.ddpm.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoint.pt").write_bytes((env / "ddpm" / "checkpoint.pt").read_bytes())
    (tmp_path / "d" / "config.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="num_heads"):
        check_init_ddpm(load_config(env / "tiny.yaml", [f"init.ddpm={tmp_path}/d/checkpoint.pt"]))
    check_init_ddpm(load_config(env / "tiny.yaml", [f"init.ddpm={env}/ddpm/checkpoint.pt"]))


def test_not_an_original_checkpoint(tmp_path, env):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="neither an original DiTi/PDAE run"):
        import_original(tmp_path / "x.pt", tmp_path / "o", str(env / "tiny.yaml"))
