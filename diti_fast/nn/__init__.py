"""Networks: the DDPM UNet, DiTi's ShiftUNet decoder and the encoders."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import FastConfig, ModelConfig, channels_last_on
from .attention import BACKENDS, qkv_attention
from .blocks import FastOptions
from .encoder import ENCODER_SPECS, Encoder
from .unet import FROZEN, TRAINABLE, ShiftUNet, UNet


def configure_fast(module: nn.Module, fast: FastConfig, device_type: str = "cpu") -> nn.Module:
    """Switch every block of ``module`` to the fused GroupNorm kernel / an attention backend, and
    to channels_last when ``fast.channels_last`` says so for ``device_type`` (the conv weights are
    re-laid out here, once; the blocks then keep activations in that layout)."""
    if fast.attention not in BACKENDS:
        raise ValueError(f"attention backend {fast.attention!r} is not one of {BACKENDS}")
    for m in module.modules():
        if isinstance(m, FastOptions):
            m.fused_norm = fast.fused_norm
            m.attention = fast.attention
    return set_channels_last(module, channels_last_on(fast, device_type))


def set_channels_last(module: nn.Module, on: bool, weights: bool = True) -> nn.Module:
    """The blocks' activation layout switch, and (``weights``) the conv weights re-laid out to
    match. The training engine re-lays the weights itself, after DeepSpeed's start-up."""
    for m in module.modules():
        if isinstance(m, FastOptions):
            m.channels_last = on
    return module.to(memory_format=torch.channels_last) if on and weights else module


def build_encoder(cfg: ModelConfig, fast: FastConfig | None = None, device_type: str = "cpu") -> Encoder:
    enc = Encoder(cfg.encoder.name, cfg.encoder.latent_dim, cfg.unet.input_channel)
    return configure_fast(enc, fast or FastConfig(), device_type)


def build_decoder(cfg: ModelConfig, fast: FastConfig | None = None, device_type: str = "cpu") -> ShiftUNet:
    return configure_fast(ShiftUNet(cfg.unet), fast or FastConfig(), device_type)


def build_unet(cfg: ModelConfig, fast: FastConfig | None = None, device_type: str = "cpu") -> UNet:
    return configure_fast(UNet(cfg.unet), fast or FastConfig(), device_type)


__all__ = ["UNet", "ShiftUNet", "Encoder", "ENCODER_SPECS", "FROZEN", "TRAINABLE", "configure_fast", "set_channels_last",
           "build_encoder", "build_decoder", "build_unet", "qkv_attention", "BACKENDS"]
