"""The original DiTi/PDAE code's ``config.yml`` files checked against this project's config.

Its checkpoints hold no model hyper-parameters; its YAML files do. Each check raises a
:class:`~diti_fast.config.ConfigError` naming every field that differs (ours and theirs), before a
weight is read. Used by ``diti-fast import-original`` and by stage diti's frozen-DDPM check.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, UNetConfig, comparable, from_dict, load_yaml, to_dict

# The original's encoder classes (encoder_config.model) -> this project's encoder names.
ENCODER_CLASSES = {"CELEBA64Encoder": "celeba64", "FFHQEncoder": "ffhq128", "BEDROOMEncoder": "bedroom128"}


def _compare(pairs, what: str) -> None:
    """``pairs``: (our dotted field, our value, their field, their value). Raise naming every mismatch."""
    diffs = [f"{ours}: preset has {a!r}, {theirs} has {b!r}" for ours, a, theirs, b in pairs if comparable(a) != comparable(b)]
    if diffs:
        raise ConfigError(f"{what} disagrees with the preset: " + "; ".join(diffs)
                          + " (choose the preset of that original config, or override the field)")


def check_ddpm_config(model_cfg, path: str | Path) -> list[str]:
    """Check the original DDPM's config.yml against ``model_cfg``; returns the fields it did not check."""
    data = load_yaml(path)
    unet = data.get("denoise_fn_config")
    if not isinstance(unet, dict):
        raise ConfigError(f"{path}: no denoise_fn_config mapping; is this the config.yml of an original DDPM?")
    known = {k: v for k, v in unet.items() if k in UNetConfig.__dataclass_fields__ and k != "latent_dim"}
    theirs = to_dict(from_dict(UNetConfig, {**to_dict(model_cfg.unet), **known}, f"{path}: denoise_fn_config"))
    ours = to_dict(model_cfg.unet)
    pairs = [(f"model.unet.{k}", ours[k], f"{path} denoise_fn_config.{k}", theirs[k]) for k in known]
    diff = data.get("diffusion_config")
    if isinstance(diff, dict):
        od = to_dict(model_cfg.diffusion)
        pairs += [(f"model.diffusion.{k}", od[k], f"{path} diffusion_config.{k}", v) for k, v in diff.items() if k in od]
    _compare(pairs, f"the DDPM's {path}")
    return sorted(k for k in unet if k not in known and k not in ("model", "latent_dim"))


def check_run_config(cfg, path: str | Path) -> None:
    """Check the original run's config.yml (masks, mode, encoder, diffusion) against the TrainConfig."""
    data = load_yaml(path)
    pairs = []
    enc = (data.get("encoder_config") or {}).get("model")
    if enc is not None:
        pairs.append(("model.encoder.name", cfg.model.encoder.name, f"{path} encoder_config.model",
                      ENCODER_CLASSES.get(enc, enc)))
    ssl = data.get("ssl_config")
    if isinstance(ssl, dict):
        m = cfg.model.masks
        pairs += [("model.masks.k", m.k, f"{path} ssl_config.k", ssl.get("k", m.k)),
                  ("model.masks.stages", m.stages, f"{path} ssl_config.stages", ssl.get("stages")),
                  ("model.masks.dims_per_stage", m.dims_per_stage, f"{path} ssl_config.dims_per_stage",
                   ssl.get("dims_per_stage")),
                  ("diti.mode", cfg.diti.mode, f"{path} ssl_config.pdae_mode", ssl.get("pdae_mode", "base"))]
        if ssl.get("no_pdae"):
            raise ConfigError(f"{path}: ssl_config.no_pdae is set: an SSL baseline (SimCLR/SimSiam) without a "
                              "diffusion decoder, which this project does not train or import")
    else:
        pairs.append(("diti.mode", cfg.diti.mode, f"{path} (no ssl_config: the original's PDAE trainer)", "pdae"))
    diff = data.get("diffusion_config")
    if isinstance(diff, dict):
        od = to_dict(cfg.model.diffusion)
        pairs += [(f"model.diffusion.{k}", od[k], f"{path} diffusion_config.{k}", v) for k, v in diff.items() if k in od]
    _compare(pairs, f"the run's {path}")
