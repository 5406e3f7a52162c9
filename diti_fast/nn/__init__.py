"""Networks: the DDPM UNet, DiTi's ShiftUNet decoder and the encoders."""
from __future__ import annotations

import torch.nn as nn

from ..config import FastConfig, ModelConfig
from .attention import BACKENDS, qkv_attention
from .blocks import FastOptions
from .encoder import ENCODER_SPECS, Encoder
from .unet import FROZEN, TRAINABLE, ShiftUNet, UNet


def configure_fast(module: nn.Module, fast: FastConfig) -> nn.Module:
    """Switch every block of ``module`` to the fused GroupNorm kernel / an attention backend."""
    if fast.attention not in BACKENDS:
        raise ValueError(f"attention backend {fast.attention!r} is not one of {BACKENDS}")
    for m in module.modules():
        if isinstance(m, FastOptions):
            m.fused_norm = fast.fused_norm
            m.attention = fast.attention
    return module


def build_encoder(cfg: ModelConfig, fast: FastConfig | None = None) -> Encoder:
    enc = Encoder(cfg.encoder.name, cfg.encoder.latent_dim, cfg.unet.input_channel)
    return configure_fast(enc, fast or FastConfig())


def build_decoder(cfg: ModelConfig, fast: FastConfig | None = None) -> ShiftUNet:
    return configure_fast(ShiftUNet(cfg.unet), fast or FastConfig())


def build_unet(cfg: ModelConfig, fast: FastConfig | None = None) -> UNet:
    return configure_fast(UNet(cfg.unet), fast or FastConfig())


__all__ = ["UNet", "ShiftUNet", "Encoder", "ENCODER_SPECS", "FROZEN", "TRAINABLE", "configure_fast",
           "build_encoder", "build_decoder", "build_unet", "qkv_attention", "BACKENDS"]
