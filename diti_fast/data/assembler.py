"""Decoding samples straight into preallocated batch arrays (no per-sample tensors)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .codec import DecodeError, SizeError, decode_image_into, key_index
from .shard_reader import refuse_size
from .shard_spec import ShardSpec
from .skip_stats import SkipStats


def sample_index(sample: dict) -> int:
    """The index written into the key by data_shards; for other tools' keys, the sample's position
    in storage order (set by the reader when the counts are known), else -1."""
    i = key_index(sample["__key__"])
    return i if i >= 0 else sample.get("__pos__", -1)


class BatchAssembler:
    """Samples arrive checked by ``shard_reader.check_sample`` (``__image__`` names the image member,
    ``__labels__`` holds the parsed labels)."""

    def __init__(self, spec: ShardSpec, stats: SkipStats, with_keys: bool = False):
        self.spec = spec
        self.shape = (spec.channels, spec.image_size, spec.image_size)
        self.image_bytes = spec.image_bytes
        self.num_attrs = spec.num_attrs
        self.stats = stats
        self.with_keys = with_keys
        self.shared = get_worker_info() is not None

    def start(self, n: int) -> dict:
        image = torch.empty((n, *self.shape), dtype=torch.uint8)
        if self.shared:
            # In a DataLoader worker the batch must reach shared memory anyway; allocating it
            # there saves torch a full copy when the batch is sent to the main process.
            image.share_memory_()
        return {
            "tensor": image,
            "image": image.numpy(),
            "attrs": np.empty((n, self.num_attrs), np.float32) if self.num_attrs else None,
            "index": np.empty(n, np.int64),
            "key": [] if self.with_keys else None,
            "rows": 0,
        }

    def put(self, batch: dict, sample: dict, flip: bool = False) -> bool:
        """Decode ``sample`` into the next free row; False (and counted) if it cannot be used."""
        row = batch["rows"]
        spec, ext = self.spec, sample["__image__"]
        url, key = sample.get("__url__", "?"), sample.get("__key__")
        try:
            decode_image_into(batch["image"][row], sample[ext], ext, flip, spec.size_mismatch, spec.resample)
        except DecodeError as exc:
            self.stats.skip("decode", url, key, str(exc))
            return False
        except SizeError as exc:
            refuse_size(spec, self.stats, url, key, str(exc))
            return False
        if self.stats.guard is not None:
            self.stats.guard.good()
        if self.num_attrs:
            batch["attrs"][row] = sample["__labels__"]
        batch["index"][row] = sample_index(sample)
        if self.with_keys:
            batch["key"].append(key)
        batch["rows"] = row + 1
        return True

    def put_many(self, batch: dict, samples: list[dict], flips: np.ndarray | None = None) -> None:
        """Fill the next rows from ``samples``. Raw images of the target size (length-checked before
        they got here) go in with one vectorised copy per batch, not one per sample; others one by
        one, skipping (and counting) those that cannot be used."""
        if flips is None:
            flips = np.zeros(len(samples), bool)
        n = len(samples)
        if n == 0:
            return
        if not all(x["__image__"] == "u8" and len(x["u8"]) == self.image_bytes for x in samples):
            for sample, flip in zip(samples, flips):
                self.put(batch, sample, bool(flip))
            return
        row = batch["rows"]
        rows = batch["image"][row:row + n]
        np.concatenate([np.frombuffer(x["u8"], np.uint8) for x in samples], out=rows.reshape(-1))
        mirrored = np.flatnonzero(flips)
        if len(mirrored):
            rows[mirrored] = rows[mirrored][..., ::-1]
        if self.num_attrs:
            batch["attrs"][row:row + n] = np.stack([x["__labels__"] for x in samples])
        batch["index"][row:row + n] = [sample_index(x) for x in samples]
        if self.with_keys:
            batch["key"].extend(x["__key__"] for x in samples)
        batch["rows"] = row + n

    def finish(self, batch: dict) -> dict:
        n = batch["rows"]
        # index/attrs stay numpy until the main process (BatchLoader) wraps them: small arrays
        # pickle inline, whereas every tensor would cost a shared-memory segment per batch.
        out = {
            "image": batch["tensor"][:n],  # a contiguous view: rows are filled in order
            "index": batch["index"][:n],
            "attrs": None if batch["attrs"] is None else batch["attrs"][:n],
        }
        if self.with_keys:
            out["key"] = batch["key"]
        return out
