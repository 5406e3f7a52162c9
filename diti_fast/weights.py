"""Every way weights enter or leave a model, with errors that name the keys.

* The original code's checkpoints (``torch.load(weights_only=True)``; ``_orig_mod.`` key prefixes of its
  ``--compile`` runs are stripped): a pre-trained DDPM
  ``{"ema_denoise_fn": unet_state, ...}`` (also ``denoise_fn``), which fills a plain UNet or the frozen
  part of a ShiftUNet; a full DiTi/PDAE run ``{"encoder", "decoder", "ema_encoder", "ema_decoder", ...}``.
* Our exports: one safetensors file per run stage with the resolved config in its metadata
  (``RUN/export/ema.safetensors``; layout below). :func:`read_weights` is the one safetensors reader.
* Our training checkpoints' model part goes through :func:`load_state` (``engine/checkpoints.py``
  holds the rest of the training state).

Export layout (written by the engine, read by evaluation and sampling):
* tensors ``unet.*`` (stage ddpm) or ``encoder.*`` + ``decoder.*`` (stage diti; the decoder holds the
  whole ShiftUNet, frozen DDPM included, so the file is self-contained);
* metadata ``config``: the resolved run config as JSON, with at least ``stage`` and ``model``
  (a :class:`~diti_fast.config.ModelConfig` as a dict).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, FastConfig, ModelConfig, from_dict, to_dict
from .files import honour_umask
from .nn import TRAINABLE, Encoder, ShiftUNet, UNet, build_decoder, build_encoder, build_unet


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the missing, unexpected or mis-shaped keys."""


def _fmt(keys, n=8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def diff_state(module: nn.Module, state: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped 'key: ckpt shape vs model shape') of ``state`` against ``module``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shaped


def load_state(module: nn.Module, state: dict, what: str, allow_missing=(), allow_unexpected=()) -> None:
    """Strict load; keys starting with a prefix in ``allow_*`` may be absent / extra."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: expected a state dict of tensors")
    missing, unexpected, shaped = diff_state(module, state)
    missing = [k for k in missing if not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in unexpected if not k.startswith(tuple(allow_unexpected))]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if shaped:
        problems.append(f"mis-shaped keys: {_fmt(shaped, 4)}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)


def torch_load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(data).__name__}")
    return data


COMPILE_PREFIX = "_orig_mod."


def strip_compile_prefix(state: dict) -> dict:
    """Keys of a ``torch.compile``-wrapped module (the original's ``--compile`` runs save
    ``_orig_mod.input_blocks...``) -> the plain module's keys; other keys unchanged."""
    if not isinstance(state, dict):
        return state
    out = {}
    for k, v in state.items():
        name = k
        while isinstance(name, str) and name.startswith(COMPILE_PREFIX):
            name = name[len(COMPILE_PREFIX):]
        if name in out:
            raise CheckpointError(f"key {name!r} appears both with and without the {COMPILE_PREFIX!r} prefix")
        out[name] = v
    return out


DDPM_KEYS = ("ema_denoise_fn", "denoise_fn")
RUN_KEYS = ("encoder", "decoder", "ema_encoder", "ema_decoder")


def load_original_ddpm(model: nn.Module, path_or_data, use_ema: bool = True) -> None:
    """Fill a UNet, or the frozen part of a ShiftUNet, from the original's DDPM checkpoint."""
    data = torch_load(path_or_data) if not isinstance(path_or_data, dict) else path_or_data
    key = next((k for k in (DDPM_KEYS if use_ema else DDPM_KEYS[::-1]) if k in data), None)
    if key is None:
        raise CheckpointError(f"not an original DDPM checkpoint: none of {list(DDPM_KEYS)} among keys "
                              f"{_fmt(list(data))}")
    load_state(model, strip_compile_prefix(data[key]), f"DDPM checkpoint [{key}]", allow_missing=TRAINABLE)


def load_original_run(encoder: nn.Module, decoder: nn.Module, path_or_data, use_ema: bool = True) -> None:
    """Load a full DiTi/PDAE run checkpoint of the original code (EMA weights by default)."""
    data = torch_load(path_or_data) if not isinstance(path_or_data, dict) else path_or_data
    enc_key, dec_key = ("ema_encoder", "ema_decoder") if use_ema else ("encoder", "decoder")
    absent = [k for k in (enc_key, dec_key) if k not in data]
    if absent:
        raise CheckpointError(f"not an original DiTi run checkpoint: missing {absent} among keys {_fmt(list(data))}")
    load_state(encoder, strip_compile_prefix(data[enc_key]), f"run checkpoint [{enc_key}]")
    load_state(decoder, strip_compile_prefix(data[dec_key]), f"run checkpoint [{dec_key}]")


# --------------------------------------------------------------------------- our weights (safetensors)

def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Atomic safetensors write; ``config`` goes into the metadata as JSON."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"config": json.dumps(config)} if config is not None else None
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    honour_umask(tmp)  # safetensors creates its files 0600: colleagues' eval jobs could not read them
    tmp.replace(path)


def load_weights(path: str | Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, config from the metadata or None): the one safetensors reader. ``tensors=False``
    reads the header only (an empty dict comes back), e.g. to check a config before any work."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            meta = f.metadata() or {}
        cfg = json.loads(meta["config"]) if "config" in meta else None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return out, cfg


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def join_prefixed(**parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, sd in parts.items() for k, v in sd.items()}


# --------------------------------------------------------------------------- exports

EXPORT_NAME = "ema.safetensors"


def export_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "export" / EXPORT_NAME


def save_export(path: str | Path, stage: str, model_cfg: ModelConfig, run_config: dict | None = None,
                **parts: nn.Module | dict[str, torch.Tensor]) -> Path:
    """``parts``: unet=... (ddpm) or encoder=..., decoder=... (diti), each a module or a state dict
    (the engine passes its EMA state dicts: no model is built just to be saved)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(run_config or {})
    config.update(stage=stage, model=to_dict(model_cfg))
    states = {k: m.state_dict() if isinstance(m, nn.Module) else m for k, m in parts.items()}
    save_weights(path, join_prefixed(**states), config)
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
