"""The training stream: resampled shards, sample shuffle, random flip, fixed epoch length.

One rank's epoch is ``num_batches`` batches. Batch ``j`` is the ``j // S``-th batch of virtual
stream ``j % S`` (S = ``streams``). Each virtual stream is sequential: it draws shards with
replacement (weighted by their sample counts), starts its first shard at a random offset so that
streams sharing a shard do not march in step, passes samples through its share of the shuffle
buffer, and draws flips — all from its own generator seeded by (seed, epoch, rank, world_size,
stream). The epoch is therefore a deterministic function of (seed, epoch, rank, world_size,
streams), whatever the number of DataLoader workers: workers only decide who computes what.

Worker w of k computes the remaining batches t = 0, 1, ... (after ``skip_batches``) with
t % k == w, which is the order torch's DataLoader collects them in. When k divides S each
worker owns whole streams; otherwise it also advances (reads, without decoding) batches of its
streams that other workers emit.
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .assembler import BatchAssembler
from .errors import DataError
from .shard_spec import ShardSpec
from .skip_stats import SkipStats, StallGuard
from .shard_reader import ShardRead, check_sample

_STREAM_TAG = 0x7D17  # separates these seeds from any other use of the same user seed
_UNIFORM_BLOCK = 4096


class _VirtualStream:
    def __init__(self, spec: ShardSpec, seed: int, epoch: int, rank: int, world_size: int, stream: int,
                 buffer_size: int, batch_size: int, hflip: bool, stats: SkipStats, assembler: BatchAssembler):
        self.spec = spec
        self.rng = np.random.default_rng([_STREAM_TAG, seed, epoch, rank, world_size, stream])
        self.buffer_size = max(1, buffer_size)
        self.batch_size = batch_size
        self.hflip = hflip
        self.stats = stats
        self.assembler = assembler
        self.buffer: list[dict] = []
        self.batches_done = 0
        self._uniform = np.empty(0)
        self._u = 0
        counts = spec.counts
        if counts is not None and sum(counts) > 0:
            self._weights = np.asarray(counts, np.float64) / sum(counts)
        else:
            self._weights = None
        self._samples = self._source()

    def _uniform01(self) -> float:
        # Block draws: a scalar Generator call per sample would dominate the loop.
        if self._u >= len(self._uniform):
            self._uniform = self.rng.random(_UNIFORM_BLOCK)
            self._u = 0
        self._u += 1
        return float(self._uniform[self._u - 1])

    def _source(self) -> Iterator[dict]:
        spec, first, barren = self.spec, True, 0
        n = len(spec.urls)
        starts = None if spec.counts is None else [0, *accumulate(spec.counts)]
        while True:
            if self._weights is not None:
                shard = int(self.rng.choice(n, p=self._weights))
            else:
                shard = int(self.rng.integers(n))
            skip = 0
            if first and spec.counts is not None and spec.counts[shard] > 1:
                skip = int(self.rng.integers(spec.counts[shard]))
            first = False
            good = 0
            read = ShardRead(spec.urls[shard], self.stats, skip=skip, limits=spec.limits)
            base = None if starts is None else starts[shard] + skip
            for i, sample in enumerate(read):
                sample["__pos__"] = -1 if base is None else base + i  # storage position, for foreign keys
                if check_sample(sample, spec, self.stats):
                    good += 1
                    if sample["__image__"] == "u8":  # fully checked: usable (others once decoded)
                        self.stats.guard.good()
                    yield sample
            # A shard yielding nothing is dead weight; if it keeps happening, the set is unusable.
            barren = 0 if good else barren + 1
            if barren > 8 + 2 * n:
                why = self.stats.examples[-1] if self.stats.examples else f"{spec.urls[shard]}: no samples"
                raise DataError(f"no readable samples after {barren} shard reads in a row; last: {why}")

    def _next(self) -> dict:
        buf = self.buffer
        while len(buf) < self.buffer_size:
            buf.append(next(self._samples))
        i = int(self._uniform01() * len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        return buf.pop()

    def _flips(self) -> np.ndarray:
        draws = self.rng.random(self.batch_size)
        return draws < 0.5 if self.hflip else np.zeros(self.batch_size, bool)

    def skip_batch(self) -> None:
        """Advance exactly as ``next_batch`` would, without decoding (resume, foreign batches)."""
        muted, self.stats.muted = self.stats.muted, True
        try:
            self._flips()
            for _ in range(self.batch_size):
                self._next()
        finally:
            self.stats.muted = muted
        self.batches_done += 1

    def next_batch(self) -> dict:
        flips = self._flips()
        batch = self.assembler.start(self.batch_size)
        self.assembler.put_many(batch, [self._next() for _ in range(self.batch_size)], flips)
        self._refill(batch, flips)
        self.batches_done += 1
        return self.assembler.finish(batch)

    def _refill(self, batch: dict, flips: np.ndarray) -> None:
        """Rows left empty by samples that failed to decode get buffered samples, read but not
        consumed: topping the buffer up to its size is what the next draw would do anyway, so the
        stream's position does not change. Only if the whole buffer fails does it consume more."""
        tried = 0
        while batch["rows"] < self.batch_size:
            flip = bool(flips[batch["rows"]])
            buf = self.buffer
            if tried >= len(buf) and len(buf) < self.buffer_size:
                buf.append(next(self._samples))
            if tried < len(buf):
                candidate, tried = buf[tried], tried + 1
                muted, self.stats.muted = self.stats.muted, True  # counted when it is drawn itself
                try:
                    self.assembler.put(batch, candidate, flip)
                finally:
                    self.stats.muted = muted
            else:
                self.assembler.put(batch, self._next(), flip)


class TrainStream(IterableDataset):
    """One rank's epoch as an IterableDataset of ready batches (use with ``batch_size=None``)."""

    def __init__(self, spec: ShardSpec, *, batch_size: int, num_batches: int, seed: int, epoch: int,
                 rank: int, world_size: int, streams: int, shuffle_buffer: int, hflip: bool,
                 skip_batches: int, strict: bool):
        self.spec = spec
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.streams = streams
        self.per_stream_buffer = max(1, shuffle_buffer // streams)
        self.hflip = hflip
        self.skip_batches = skip_batches
        self.strict = strict

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SkipStats(self.strict)
        stats.guard = StallGuard(self.spec.max_consecutive_skips)
        assembler = BatchAssembler(self.spec, stats)
        streams: dict[int, _VirtualStream] = {}
        for j in range(self.skip_batches + w, self.num_batches, k):
            v = j % self.streams
            st = streams.get(v)
            if st is None:
                st = streams[v] = _VirtualStream(
                    self.spec, self.seed, self.epoch, self.rank, self.world_size, v,
                    self.per_stream_buffer, self.batch_size, self.hflip, stats, assembler)
            while st.batches_done < j // self.streams:
                st.skip_batch()
            batch = st.next_batch()
            stats.samples += self.batch_size
            batch["_stats"] = stats.take_delta()
            yield batch
        delta = stats.take_delta()
        if delta:
            yield {"_stats": delta}


def read_amplification(num_workers: int, streams: int) -> int:
    """How many times each sample is read (not decoded) when workers do not divide streams."""
    k = max(1, num_workers)
    return k // math.gcd(k, streams)
