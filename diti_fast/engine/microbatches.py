"""The engine's input: this rank's micro-batches, resumable, from shards or one fixed batch."""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
import torch.nn as nn

from diti_fast.config import ConfigError
from diti_fast.data.errors import DataError
from diti_fast.data.model_input import to_model_input as _convert
from diti_fast.data.skip_stats import REASONS
from diti_fast.engine.distributed import Ranks
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
    (seed, epoch, rank, world_size) and can skip to a batch, so resuming replays the same stream
    (skipped samples never shift it: see diti_fast/data/train_stream.py).
    """

    def __init__(self, cfg: TrainConfig, ranks: Ranks, size: int, position: dict | None):
        self.cfg, self.rank, self.world, self.micro = cfg, ranks.rank, ranks.world, ranks.micro
        self.device = ranks.device
        self.position = dict(position or {"epoch": 0, "batch": 0})
        self._it = None
        self._loader = None
        self._skipped: Counter = Counter()  # finished epochs of this launch
        if cfg.data.source == "fixed":
            self.fixed = fixed_batch(cfg, size).to(self.device)  # on the device once: no copy per step
            self.local = cfg.data.batch_size // self.world
        else:
            self.spec, self.epoch_samples = shard_set(cfg, size)

    def next(self, micro_step: int) -> torch.Tensor:
        if self.cfg.data.source == "fixed":
            start = self.rank * self.local + micro_step * self.micro
            return self.fixed[start:start + self.micro]
        while True:
            if self._it is None:
                from diti_fast.data.loader import train_loader  # webdataset (~0.2 s): shard runs only
                d = self.cfg.data
                self._loader = train_loader(
                    self.spec, batch_size=self.micro, seed=self.cfg.run.seed, epoch_samples=self.epoch_samples,
                    rank=self.rank, world_size=self.world, num_workers=d.num_workers, hflip=d.hflip,
                    start_epoch=self.position["epoch"], skip_batches=self.position["batch"],
                    shuffle_buffer=d.shuffle_buffer, strict=d.strict)
                self._it = iter(self._loader)
            batch = next(self._it, None)
            if batch is None:  # end of epoch
                self._skipped.update(self._loader.stats["skipped_by_reason"])
                self._it = self._loader = None
                self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}
                continue
            self.position["batch"] += 1
            return batch["image"]

    def log_fields(self) -> dict:
        """``data_skipped``: samples skipped by cause since this launch started, summed over ranks
        (a collective: call it on every rank, where the engine reduces its metrics anyway)."""
        if self.cfg.data.source == "fixed":
            return {}
        counts = Counter(self._skipped)
        if self._loader is not None:
            counts.update(self._loader.stats["skipped_by_reason"])
        if self.world > 1 and dist.is_initialized():
            t = torch.tensor([counts[r] for r in REASONS], dtype=torch.int64, device=self.device)
            dist.all_reduce(t)
            counts = Counter(dict(zip(REASONS, t.tolist())))
        return {"data_skipped": {r: int(counts[r]) for r in REASONS}}


_SHARD_SETS: dict = {}


def shard_set(cfg: TrainConfig, size: int | None = None):
    """(resolved ShardSpec read at ``size``, epoch samples), resolved once per process: a remote
    manifest is fetched, a manifest-less set counted and ``data.verify`` hashed only once."""
    from diti_fast.data.loader import prepare_spec  # webdataset (~0.2 s): shard runs only
    d = cfg.data
    key = (repr(d.shards), d.verify, d.size_mismatch, d.resample, d.max_consecutive_skips, d.num_samples,
           d.stream_timeout_s, d.stream_stall_s)
    if key not in _SHARD_SETS:
        try:
            spec = prepare_spec(list(d.shards) if isinstance(d.shards, list) else d.shards, verify=d.verify,
                                size_mismatch=d.size_mismatch, resample=d.resample,
                                max_consecutive_skips=d.max_consecutive_skips,
                                stream_timeout_s=d.stream_timeout_s, stream_stall_s=d.stream_stall_s)
            n = spec.num_samples or d.num_samples or spec.with_counts().num_samples
        except (DataError, OSError, ValueError) as e:  # FileNotFoundError, DataFormatError, bad URL
            raise ConfigError(f"data.shards={d.shards}: {e}") from None
        _SHARD_SETS.clear()  # one set per launch: the cache only spares re-reading it
        _SHARD_SETS[key] = (spec, n)
    spec, n = _SHARD_SETS[key]
    return (spec if size is None else spec.reading(image_size=size)), n


def check_shards(cfg: TrainConfig, world: int, micro: int) -> int | None:
    """Validate the shard set before any work; returns its image size."""
    if cfg.data.source != "shards":
        return None
    _SHARD_SETS.clear()  # a new launch re-reads the set (it may have changed since the last one)
    spec, n = shard_set(cfg)
    size = spec.image_size
    want = cfg.image_size(size)
    d = cfg.data
    if size != want and d.size_mismatch != "resize":
        raise ConfigError(f"data.shards={d.shards} holds {size}x{size} images but the model takes "
                          f"{want}x{want} (model.encoder.name={cfg.model.encoder.name!r}, "
                          f"data.image_size={d.image_size}) and data.size_mismatch={d.size_mismatch!r}; "
                          "data.size_mismatch=resize center-crops and resizes them on load")
    if spec.channels != cfg.model.unet.input_channel:
        raise ConfigError(f"data.shards={d.shards} has {spec.channels} channels but "
                          f"model.unet.input_channel={cfg.model.unet.input_channel}")
    if n // world // micro < 1:
        raise ConfigError(f"data.shards={d.shards} has {n} samples, fewer than one "
                          f"micro-batch per rank (data.batch_size={d.batch_size} over {world} ranks)")
    return size


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _convert(images, device)
