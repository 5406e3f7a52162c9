"""DiTi's image encoders: strided convs with GroupNorm+SiLU, one attention block, a linear head.

The Sequential indices reproduce the original's state-dict keys (``encoder.N.*``):
conv, [GN, SiLU, conv | attention]..., GN, SiLU, flatten, Linear.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import AttentionBlock, FastOptions, group_norm, norm_act, to_layout

# (image size, conv output channels, index of the conv after which the attention block sits)
ENCODER_SPECS = {
    "celeba64": (64, (64, 128, 128, 128), 1),        # 1,487,104 parameters
    "ffhq128": (128, (64, 128, 256, 256, 256), 2),   # 3,914,240 parameters
    "bedroom128": (128, (64, 128, 256, 256, 256), 2),
    "shapes32": (32, (64, 128, 128), 1),             # the CPU demo's 32x32 synthetic images
    "staged16": (16, (64, 128), 1),                  # the claim experiment's 16x16 staged design
}


class Encoder(nn.Module, FastOptions):
    def __init__(self, name: str = "celeba64", latent_dim: int = 512, in_channels: int = 3):
        super().__init__()
        if name not in ENCODER_SPECS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_SPECS)}")
        size, chans, attn_after = ENCODER_SPECS[name]
        self.name, self.image_size, self.latent_dim = name, size, latent_dim
        layers: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, 2, 1)]
        for i in range(1, len(chans)):
            layers += [group_norm(chans[i - 1]), nn.SiLU(), nn.Conv2d(chans[i - 1], chans[i], 3, 2, 1)]
            if i == attn_after:
                layers.append(AttentionBlock(chans[i], num_heads=4))
        side = size // 2 ** len(chans)
        layers += [group_norm(chans[-1]), nn.SiLU(), nn.Flatten(), nn.Linear(chans[-1] * side * side, latent_dim)]
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"encoder {self.name!r} expects {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape)}")
        x = to_layout(x, self.channels_last)
        layers = list(self.encoder)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.GroupNorm):
                # GN is always followed by SiLU here: one fused call covers both.
                x = norm_act(layer, x, fused=self.fused_norm)
                i += 2
                continue
            if isinstance(layer, nn.Flatten) and self.channels_last:
                # The linear head's weights read the feature map in NCHW order: the one layout
                # copy of a channels_last encoder, explicit, of the last (smallest) map B×C·h·w.
                x = x.contiguous()
            x = layer(x)
            i += 1
        return x
