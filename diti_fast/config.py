"""Typed, validated configuration.

Every section is a dataclass; ``from_dict`` builds one from plain YAML data and refuses unknown keys
and wrong types with an error that names the file and the dotted key (``model.base_channel``), so a
typo fails at start-up instead of an hour into a run. Field names of the model sections are the
original DiTi names, so the original's config dicts (and the golden fixture's) load unchanged.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent."""


# --------------------------------------------------------------------------- generic machinery

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and args and args[0] is int:
            # The original writes integer lists as "50,100,300" strings.
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"{where}: cannot read {value!r} as a comma-separated list of integers")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_t = args[0] if args else Any
        out = [_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            # YAML reads "38e6" (no dot) as a string: a number in exponent form is accepted when its
            # value is a whole number, like 38.0e6 or 38000000.
            try:
                value = float(value.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys; runs ``cls.validate`` if any."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj) -> dict:
    """Dataclass -> plain YAML-able data (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


# --------------------------------------------------------------------------- model sections

GROUPS = 32  # nn.GroupNorm(32, C) everywhere in the original


@dataclass
class UNetConfig:
    """Guided-diffusion UNet / ShiftUNet hyper-parameters, in the original's names."""
    input_channel: int = 3
    base_channel: int = 64
    channel_multiplier: tuple[int, ...] = (1, 2, 4, 8)
    num_residual_blocks_of_a_block: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # downsample factors, not pixel sizes
    num_heads: int = 1
    head_channel: int = -1  # -1: use num_heads
    use_new_attention_order: bool = False
    dropout: float = 0.1
    latent_dim: int = 512

    def validate(self, where: str = "unet") -> None:
        if self.input_channel <= 0:
            raise ConfigError(f"{where}.input_channel must be positive")
        if not self.channel_multiplier:
            raise ConfigError(f"{where}.channel_multiplier must not be empty")
        for m in self.channel_multiplier:
            c = int(m * self.base_channel)
            if c <= 0 or c % GROUPS:
                raise ConfigError(
                    f"{where}.base_channel x channel_multiplier gives {c} channels, which is not a "
                    f"positive multiple of {GROUPS} GroupNorm groups")
            if self.head_channel != -1 and c % self.head_channel:
                raise ConfigError(f"{where}.head_channel={self.head_channel} does not divide {c} channels")
            if self.head_channel == -1 and c % self.num_heads:
                raise ConfigError(f"{where}.num_heads={self.num_heads} does not divide {c} channels")
        if self.num_residual_blocks_of_a_block < 1:
            raise ConfigError(f"{where}.num_residual_blocks_of_a_block must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1)")
        if self.latent_dim <= 0:
            raise ConfigError(f"{where}.latent_dim must be positive")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    betas_type: typing.Literal["linear"] = "linear"
    linear_beta_start: float = 1e-4
    linear_beta_end: float = 0.02

    def validate(self, where: str = "diffusion") -> None:
        if self.timesteps < 2:
            raise ConfigError(f"{where}.timesteps must be >= 2")
        if not 0 < self.linear_beta_start < self.linear_beta_end < 1:
            raise ConfigError(f"{where}: need 0 < linear_beta_start < linear_beta_end < 1")


@dataclass
class MaskConfig:
    """DiTi's time-step stratification (the original's ``ssl_config``).

    Without ``dims_per_stage`` the masks are balanced (latent_dim / k dims per chunk).
    """
    k: int = 64
    stages: Optional[tuple[int, ...]] = None
    dims_per_stage: Optional[tuple[int, ...]] = None

    def validate(self, where: str = "masks") -> None:
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1")
        if self.dims_per_stage is not None and self.stages is None:
            raise ConfigError(f"{where}.dims_per_stage needs {where}.stages")
        if self.stages is not None:
            if list(self.stages) != sorted(set(self.stages)) or self.stages[0] <= 0:
                raise ConfigError(f"{where}.stages must be strictly increasing positive time-steps")
        if self.dims_per_stage is not None:
            if len(self.dims_per_stage) != len(self.stages):
                raise ConfigError(f"{where}.dims_per_stage has {len(self.dims_per_stage)} entries but "
                                  f"{where}.stages has {len(self.stages)}")
            if any(d < 0 for d in self.dims_per_stage):
                raise ConfigError(f"{where}.dims_per_stage must be non-negative")

    def check_against(self, latent_dim: int, timesteps: int, where: str = "masks") -> None:
        """Cross-section checks (need the UNet's latent_dim and the diffusion length)."""
        if self.k > timesteps:
            raise ConfigError(f"{where}.k={self.k} exceeds the {timesteps} time-steps")
        if self.stages is not None and self.stages[-1] != timesteps:
            raise ConfigError(f"{where}.stages must end at the number of time-steps ({timesteps}), "
                              f"got {self.stages[-1]}")
        if self.dims_per_stage is not None and sum(self.dims_per_stage) != latent_dim:
            raise ConfigError(f"{where}.dims_per_stage sums to {sum(self.dims_per_stage)}, "
                              f"not latent_dim={latent_dim}")


ENCODERS = ("celeba64", "ffhq128", "bedroom128", "shapes32", "staged16")


@dataclass
class EncoderConfig:
    name: str = "celeba64"
    latent_dim: int = 512

    def validate(self, where: str = "encoder") -> None:
        if self.name not in ENCODERS:
            raise ConfigError(f"{where}.name={self.name!r} is not one of {list(ENCODERS)}")


@dataclass
class FastConfig:
    """Speed switches. None of them changes the maths (results agree to rounding); on a CPU all
    default to the reference path."""
    attention: typing.Literal["sdpa", "math", "xformers"] = "sdpa"
    fused_norm: bool = False  # Triton adaptive GroupNorm+SiLU (diti_fast.kernels.fused_norm)
    fused_loss: bool = False  # Triton noise-weighted loss (diti_fast.kernels.fused_loss)
    # Activations and conv weights in channels_last (NHWC in memory): cuDNN's bf16 tensor-core
    # convolutions run in that layout natively and convert NCHW operands on every call otherwise.
    # "auto": on for CUDA, off on CPU (where NCHW is the reference path).
    channels_last: bool | typing.Literal["auto"] = "auto"


def channels_last_on(fast: FastConfig, device_type: str) -> bool:
    """Whether ``fast.channels_last`` ("auto", true, false) means channels_last on this device."""
    return fast.channels_last is True or (fast.channels_last == "auto" and device_type == "cuda")


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def validate(self, where: str = "model") -> None:
        self.masks.check_against(self.unet.latent_dim, self.diffusion.timesteps, f"{where}.masks")
        if self.encoder.latent_dim != self.unet.latent_dim:
            raise ConfigError(f"{where}.encoder.latent_dim={self.encoder.latent_dim} differs from "
                              f"{where}.unet.latent_dim={self.unet.latent_dim}")


def model_config_from_original(unet_config: dict, diffusion_config: dict, ssl_config: dict,
                               encoder: str = "celeba64", where: str = "original config") -> ModelConfig:
    """Build a ModelConfig from the original DiTi's three config dicts (as in the golden fixture)."""
    unet = from_dict(UNetConfig, unet_config, f"{where}: unet_config")
    diffusion = from_dict(DiffusionConfig, diffusion_config, f"{where}: diffusion_config")
    ssl = {k: v for k, v in ssl_config.items() if k in ("k", "stages", "dims_per_stage")}
    masks = from_dict(MaskConfig, ssl, f"{where}: ssl_config")
    cfg = ModelConfig(unet=unet, diffusion=diffusion, masks=masks,
                      encoder=EncoderConfig(name=encoder, latent_dim=unet.latent_dim))
    cfg.validate(where)
    return cfg


def comparable(v):
    """A config value in one form for comparing configs from different sources: our tuples and the
    lists of saved YAML/JSON, and the original's "50,100" integer-list strings, all become lists."""
    if isinstance(v, str) and "," in v:
        try:
            return [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            return v
    if isinstance(v, (list, tuple)):
        return [comparable(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
