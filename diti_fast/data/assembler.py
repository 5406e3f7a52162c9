"""Decoding samples straight into preallocated batch arrays (no per-sample tensors)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .codec import ATTRS_EXT, IMAGE_EXT, DecodeError, decode_image_into, key_index
from .shard_spec import ShardSpec
from .skip_stats import SkipStats


class BatchAssembler:
    def __init__(self, spec: ShardSpec, stats: SkipStats, with_keys: bool = False):
        self.fmt = spec.image_format
        self.ext = IMAGE_EXT[self.fmt]
        self.shape = (spec.channels, spec.image_size, spec.image_size)
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
        """Decode ``sample`` into the next free row; False (and counted) if it cannot be decoded."""
        row = batch["rows"]
        try:
            decode_image_into(batch["image"][row], sample[self.ext], self.fmt, flip)
        except DecodeError as exc:
            self.stats.skip("corrupt_image", sample.get("__url__", "?"), sample.get("__key__"), str(exc))
            return False
        if self.num_attrs:
            batch["attrs"][row] = np.frombuffer(sample[ATTRS_EXT], "<f4")
        key = sample["__key__"]
        batch["index"][row] = key_index(key)
        if self.with_keys:
            batch["key"].append(key)
        batch["rows"] = row + 1
        return True

    def put_many(self, batch: dict, samples: list[dict], flips: np.ndarray | None = None) -> None:
        """Fill the next rows from ``samples``. Raw images (length-checked before they got here)
        go in with one vectorised copy per batch, not one per sample; encoded ones one by one,
        skipping (and counting) those that do not decode."""
        if flips is None:
            flips = np.zeros(len(samples), bool)
        if self.fmt != "u8":
            for sample, flip in zip(samples, flips):
                self.put(batch, sample, bool(flip))
            return
        row, n = batch["rows"], len(samples)
        if n == 0:
            return
        rows = batch["image"][row:row + n]
        np.concatenate([np.frombuffer(x[self.ext], np.uint8) for x in samples], out=rows.reshape(-1))
        mirrored = np.flatnonzero(flips)
        if len(mirrored):
            rows[mirrored] = rows[mirrored][..., ::-1]
        if self.num_attrs:
            flat = np.frombuffer(b"".join(x[ATTRS_EXT] for x in samples), "<f4")
            batch["attrs"][row:row + n] = flat.reshape(n, self.num_attrs)
        batch["index"][row:row + n] = [key_index(x["__key__"]) for x in samples]
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
