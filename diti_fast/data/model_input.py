"""Moving uint8 batches to the model's device and scale."""

from __future__ import annotations

import torch


def to_model_input(images: torch.Tensor, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,C,H,W] → ``device`` (non-blocking; a quarter of float32's bytes cross the bus) →
    ``dtype`` in [-1, 1] computed there as x/127.5 - 1."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {images.dtype}")
    x = images.to(device, non_blocking=True) if device is not None else images
    return x.to(dtype).div_(127.5).sub_(1.0)
