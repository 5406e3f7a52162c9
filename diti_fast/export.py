"""Exported weights: one safetensors file per run stage, with the resolved config inside.

Layout of ``RUN/export/ema.safetensors`` (written by the engine, read by evaluation and sampling):
* tensors ``unet.*`` (stage ddpm) or ``encoder.*`` + ``decoder.*`` (stage diti; the decoder holds the
  whole ShiftUNet, frozen DDPM included, so the file is self-contained);
* metadata ``config``: the resolved run config as JSON, with at least ``stage`` and ``model``
  (a :class:`~diti_fast.config.ModelConfig` as a dict).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from .checkpoint import CheckpointError, join_prefixed, load_state, load_weights, save_weights, split_prefixed
from .config import ConfigError, FastConfig, ModelConfig, from_dict, to_dict
from .nn import Encoder, ShiftUNet, UNet, build_decoder, build_encoder, build_unet

EXPORT_NAME = "ema.safetensors"


def export_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "export" / EXPORT_NAME


def save_export(path: str | Path, stage: str, model_cfg: ModelConfig, run_config: dict | None = None,
                **modules: nn.Module) -> Path:
    """``modules``: unet=... (ddpm) or encoder=..., decoder=... (diti)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(run_config or {})
    config.update(stage=stage, model=to_dict(model_cfg))
    save_weights(path, join_prefixed(**{k: m.state_dict() for k, m in modules.items()}), config)
    return path


@dataclass
class Exported:
    stage: str
    model_cfg: ModelConfig
    config: dict
    unet: UNet | None = None
    encoder: Encoder | None = None
    decoder: ShiftUNet | None = None


def load_export(path: str | Path, fast: FastConfig | None = None, device="cpu") -> Exported:
    """Rebuild the models of an export (a file, or a run directory holding export/ema.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = export_path(path)
    tensors, config = load_weights(path)
    if not config or "model" not in config or "stage" not in config:
        raise CheckpointError(f"{path}: no resolved config (stage, model) in the file's metadata; "
                              "was it written by diti_fast's export?")
    try:
        model_cfg = from_dict(ModelConfig, config["model"], f"{path} [metadata model]")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    out = Exported(config["stage"], model_cfg, config)
    if config["stage"] == "ddpm":
        out.unet = build_unet(model_cfg, fast).to(device)
        load_state(out.unet, split_prefixed(tensors, "unet"), f"{path} [unet]")
        out.unet.eval()
    elif config["stage"] == "diti":
        out.encoder = build_encoder(model_cfg, fast).to(device)
        out.decoder = build_decoder(model_cfg, fast).to(device)
        load_state(out.encoder, split_prefixed(tensors, "encoder"), f"{path} [encoder]")
        load_state(out.decoder, split_prefixed(tensors, "decoder"), f"{path} [decoder]")
        out.encoder.eval()
        out.decoder.eval()
    else:
        raise CheckpointError(f"{path}: unknown stage {config['stage']!r} in metadata")
    return out
