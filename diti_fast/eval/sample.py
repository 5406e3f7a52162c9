"""Unconditional DDPM samples (PDAE's plain DDIM) from a ddpm export, or from the frozen DDPM inside a
DiTi export's decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..diffusion import make_schedule
from ..weights import Exported
from ..nn.unet import UNet
from ..sampling import ddim_sample


class FrozenDDPM(nn.Module):
    """The ShiftUNet's frozen path as a plain ε-model: ShiftUNet subclasses UNet, and UNet.forward uses
    only the frozen modules, so no second copy of the weights is needed."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        # The wrapper takes the decoder's mode (its own flag only): samplers hand a model back in the
        # mode they found it, and a wrapper in train mode would put the decoder's shift branch there.
        self.training = decoder.training

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return UNet.forward(self.decoder, x, t)


def ddpm_of(ex: Exported) -> nn.Module:
    if ex.unet is not None:
        return ex.unet
    if ex.decoder is not None:
        return FrozenDDPM(ex.decoder)
    raise ValueError(f"export of stage {ex.stage!r} holds no DDPM")


def image_side(ex: Exported) -> int:
    if ex.encoder is not None:
        return ex.encoder.image_size
    size = ex.config.get("data", {}).get("image_size") if isinstance(ex.config.get("data"), dict) else None
    return int(size or ex.config.get("image_size") or 0)


@torch.no_grad()
def ddpm_samples(ex: Exported, num: int, steps: int = 100, seed: int = 0, device="cpu",
                 image_size: int | None = None, batch: int = 64) -> torch.Tensor:
    side = image_size or image_side(ex)
    if not side:
        raise ValueError("the export does not record its image size; pass --image-size")
    sched = make_schedule(ex.model_cfg.diffusion, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x_T = torch.randn(num, ex.model_cfg.unet.input_channel, side, side, generator=g).to(device)
    model = ddpm_of(ex)
    return torch.cat([ddim_sample(model, x_T[i:i + batch], sched, steps) for i in range(0, num, batch)])
