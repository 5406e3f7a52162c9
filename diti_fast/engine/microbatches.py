"""The engine's input: this rank's micro-batches, resumable, from shards or one fixed batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from diti_fast.config import ConfigError
from diti_fast.engine.run_config import TrainConfig


def fixed_batch(cfg: TrainConfig, size: int) -> torch.Tensor:
    """A deterministic uint8 global batch of smooth random images (the 'fixed' data source)."""
    g = torch.Generator().manual_seed(cfg.run.seed + 12345)
    low = torch.rand(cfg.data.batch_size, 3, max(1, size // 8), max(1, size // 8), generator=g)
    img = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


class MicroBatches:
    """This rank's micro-batches, endlessly, with the position needed to resume exactly.

    ``position`` = (epoch, micro-batches consumed in that epoch); the loader is deterministic in
    (seed, epoch, rank, world_size) and can skip to a batch, so resuming replays the same stream.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int, micro: int, size: int, position: dict | None,
                 device: torch.device):
        self.cfg, self.rank, self.world, self.micro = cfg, rank, world, micro
        self.position = dict(position or {"epoch": 0, "batch": 0})
        self._it = None
        if cfg.data.source == "fixed":
            self.fixed = fixed_batch(cfg, size).to(device)  # on the device once: no copy per step
            self.local = cfg.data.batch_size // world

    def next(self, micro_step: int) -> torch.Tensor:
        if self.cfg.data.source == "fixed":
            start = self.rank * self.local + micro_step * self.micro
            return self.fixed[start:start + self.micro]
        while True:
            if self._it is None:
                from diti_fast.data import train_loader
                d = self.cfg.data
                self._it = iter(train_loader(
                    d.shards, batch_size=self.micro, seed=self.cfg.run.seed, rank=self.rank,
                    world_size=self.world, num_workers=d.num_workers, hflip=d.hflip,
                    start_epoch=self.position["epoch"], skip_batches=self.position["batch"],
                    shuffle_buffer=d.shuffle_buffer, strict=d.strict))
            batch = next(self._it, None)
            if batch is None:  # end of epoch
                self._it = None
                self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}
                continue
            self.position["batch"] += 1
            return batch["image"]


def check_shards(cfg: TrainConfig, world: int, micro: int) -> int | None:
    """Validate the shard set before any work; returns its image size."""
    if cfg.data.source != "shards":
        return None
    from diti_fast.data import read_manifest
    try:
        man = read_manifest(cfg.data.shards)
    except Exception as e:  # FileNotFoundError, DataFormatError
        raise ConfigError(f"data.shards={cfg.data.shards}: {e}") from None
    size = int(man["image_size"])
    want = cfg.image_size(size)
    if size != want:
        raise ConfigError(f"data.shards={cfg.data.shards} holds {size}x{size} images but the model takes "
                          f"{want}x{want} (model.encoder.name={cfg.model.encoder.name!r}, "
                          f"data.image_size={cfg.data.image_size})")
    if int(man.get("channels", 3)) != cfg.model.unet.input_channel:
        raise ConfigError(f"data.shards={cfg.data.shards} has {man.get('channels')} channels but "
                          f"model.unet.input_channel={cfg.model.unet.input_channel}")
    if man["num_samples"] // world // micro < 1:
        raise ConfigError(f"data.shards={cfg.data.shards} has {man['num_samples']} samples, fewer than one "
                          f"micro-batch per rank (data.batch_size={cfg.data.batch_size} over {world} ranks)")
    return size


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from diti_fast.data import to_model_input as convert
    return convert(images, device)
