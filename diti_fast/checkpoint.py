"""Loading the original's checkpoints and our own weights, with errors that name the keys.

Formats understood by :func:`load_original`:
* a pre-trained DDPM from the original code: ``{"ema_denoise_fn": unet_state, ...}``
  (also ``denoise_fn``); it fills the frozen part of a ShiftUNet or a plain UNet;
* a full DiTi/PDAE run: ``{"encoder", "decoder", "ema_encoder", "ema_decoder", ...}``.
Our own exported weights are safetensors files (``save_weights`` / ``load_weights``) with the resolved
config stored as JSON in the file's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn


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


DDPM_KEYS = ("ema_denoise_fn", "denoise_fn")
RUN_KEYS = ("encoder", "decoder", "ema_encoder", "ema_decoder")


def load_original_ddpm(model: nn.Module, path_or_data, use_ema: bool = True) -> None:
    """Fill a UNet, or the frozen part of a ShiftUNet, from the original's DDPM checkpoint."""
    data = torch_load(path_or_data) if not isinstance(path_or_data, dict) else path_or_data
    key = next((k for k in (DDPM_KEYS if use_ema else DDPM_KEYS[::-1]) if k in data), None)
    if key is None:
        raise CheckpointError(f"not an original DDPM checkpoint: none of {list(DDPM_KEYS)} among keys "
                              f"{_fmt(list(data))}")
    from .nn.unet import TRAINABLE
    load_state(model, data[key], f"DDPM checkpoint [{key}]", allow_missing=TRAINABLE)


def load_original_run(encoder: nn.Module, decoder: nn.Module, path_or_data, use_ema: bool = True) -> None:
    """Load a full DiTi/PDAE run checkpoint of the original code (EMA weights by default)."""
    data = torch_load(path_or_data) if not isinstance(path_or_data, dict) else path_or_data
    enc_key, dec_key = ("ema_encoder", "ema_decoder") if use_ema else ("encoder", "decoder")
    absent = [k for k in (enc_key, dec_key) if k not in data]
    if absent:
        raise CheckpointError(f"not an original DiTi run checkpoint: missing {absent} among keys {_fmt(list(data))}")
    load_state(encoder, data[enc_key], f"run checkpoint [{enc_key}]")
    load_state(decoder, data[dec_key], f"run checkpoint [{dec_key}]")


# --------------------------------------------------------------------------- our weights (safetensors)

def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Atomic safetensors write; ``config`` goes into the metadata as JSON."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"config": json.dumps(config)} if config is not None else None
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    cfg = json.loads(meta["config"]) if "config" in meta else None
    return tensors, cfg


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def join_prefixed(**parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, sd in parts.items() for k, v in sd.items()}
