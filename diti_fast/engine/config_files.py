"""Loading a run config: a preset or YAML file, its ``extends`` chain, ``key=value`` overrides.

A run is described by one YAML file (a preset under ``configs/`` or your own) plus command-line
overrides with dotted keys (``optim.lr=2e-4 data.batch_size=64 stage=ddpm``). A file may start
from another with ``extends: NAME`` (a preset name or a path relative to the file); mappings merge
key by key, everything else is replaced. The result is typed and validated by
:class:`~diti_fast.engine.run_config.TrainConfig`; an error names the dotted field and the source
(file + overrides). The resolved config is written to ``RUN/config.yaml`` by :func:`dump_yaml`.
"""
from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path

import yaml

from ..config import ConfigError, from_dict, load_yaml, to_dict
from .run_config import TrainConfig


def _preset_files() -> dict[str, Path]:
    """Preset name -> file, from the package's presets (the repository's configs/ folder)."""
    root = importlib.resources.files("diti_fast.presets")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".yaml")}


PRESETS = tuple(sorted(_preset_files()))


def preset_path(name: str) -> Path | None:
    return _preset_files().get(name)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_config_file(spec: str | Path, _seen: tuple = ()) -> tuple[dict, str]:
    """(raw data with ``extends`` resolved, preset name) for a path or a preset name."""
    path = Path(spec)
    if not path.is_file():
        found = preset_path(str(spec)) if "/" not in str(spec) and not str(spec).endswith(".yaml") else None
        if found is None:
            raise ConfigError(f"config {spec}: no such file, and not a preset name (presets: {', '.join(PRESETS)})")
        path = found
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = load_yaml(path)
    parent = data.pop("extends", None)
    name = path.stem
    own_preset = data.get("preset")
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a preset name or a path, got {parent!r}")
        candidate = path.parent / parent
        base, _ = read_config_file(candidate if candidate.is_file() else parent, _seen + (path,))
        data = _merge(base, data)
    # The file's own name, not the one it extends (celeba64_original runs in runs/celeba64_original-*).
    data["preset"] = own_preset if own_preset is not None else name
    return data, name


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=2e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


_ROOT = "\x00"  # placeholder for the top level in messages: "optim.lr: ..." rather than "config.optim.lr"

# The learning-rate rules, for the messages that refuse a removed key.
_LR_RULES = ("global (lr x global batch / 128: the paper's lr for its 128 images on any number of GPUs), "
             "per_gpu (the original's lr x per-GPU batch / 32) or none (lr as given)")


def _check_removed(data: dict) -> None:
    """Keys this engine no longer reads are refused with their replacement named, rather than
    trained with a silently different learning rate."""
    optim = data.get("optim")
    if not isinstance(optim, dict):
        return
    if "scale_lr_by_batch" in optim:
        raise ConfigError("optim.scale_lr_by_batch was removed: the learning rate follows optim.lr_rule alone; "
                          f"choose {_LR_RULES} (scale_lr_by_batch=false was lr_rule=none)")
    if optim.get("lr_rule") == "auto":
        raise ConfigError(f"optim.lr_rule: 'auto' was removed (it meant per_gpu, none for pdae); choose {_LR_RULES}")


def build_config(data: dict, source: str = "config") -> TrainConfig:
    """Typed, validated TrainConfig; errors name the dotted field and the source (file + overrides)."""
    data = {k: v for k, v in data.items() if k != "effective"}  # written by dump_yaml, derived
    try:
        _check_removed(data)
        return from_dict(TrainConfig, data, _ROOT)
    except ConfigError as e:
        msg = str(e).replace(_ROOT + ".", "").replace(_ROOT, "config")
        raise ConfigError(f"{msg} [in {source}]") from None


def load_config(spec: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a config file or preset, apply ``key=value`` overrides, validate."""
    data, name = read_config_file(spec) if spec is not None else ({}, "config")
    data = apply_overrides(data, overrides or [])
    source = f"{spec}" + (" + command-line overrides" if overrides else "")
    return build_config(data, source)


def resolved_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)


def effective(cfg: TrainConfig, world_size: int) -> dict:
    """What the config resolves to on ``world_size`` ranks (recorded in RUN/config.yaml)."""
    return {"world_size": world_size, "lr_rule": cfg.optim.lr_rule, "lr": cfg.lr(world_size),
            "micro_batch": cfg.micro_batch(world_size)}


def dump_yaml(cfg: TrainConfig, world_size: int | None = None) -> str:
    """The resolved config; with ``world_size`` also an ``effective:`` section (the learning rate the
    run trains with, its rule, the micro-batch), which loading ignores."""
    data = resolved_dict(cfg)
    if world_size is not None:
        data["effective"] = effective(cfg, world_size)
    return yaml.safe_dump(data, sort_keys=False)
