"""The evaluation pass: finite, unshuffled, every sample exactly once across all ranks.

Samples are numbered 0..N-1 in storage order (shards in the given order, then tar order). Rank r
takes the contiguous range [r*N//W, (r+1)*N//W) and cuts it into batches; worker w of k takes a
contiguous run of those batches, so each worker reads at most two shards partially and never
reads a sample twice. This works for any number of shards, including fewer than ranks × workers
(then several workers read parts of the same shard). Batches arrive in DataLoader order (round
robin over workers, storage order within a worker) and carry ``index`` and ``key``.
"""

from __future__ import annotations

import bisect
from itertools import accumulate

from torch.utils.data import IterableDataset, get_worker_info

from .assembler import BatchAssembler
from .shard_spec import ShardSpec
from .skip_stats import SkipStats
from .shard_reader import ShardRead, check_sample


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def num_rank_batches(num_samples: int, rank: int, world_size: int, batch_size: int) -> int:
    a, b = rank_range(num_samples, rank, world_size)
    return -(-(b - a) // batch_size)


def worker_batches(num_batches: int, worker: int, num_workers: int) -> tuple[int, int]:
    return worker * num_batches // num_workers, (worker + 1) * num_batches // num_workers


def pieces(counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, offset, length) runs covering global sample positions [start, stop)."""
    ends = list(accumulate(counts))
    out = []
    pos = start
    s = bisect.bisect_right(ends, pos)
    while pos < stop and s < len(counts):
        shard_start = ends[s] - counts[s]
        take = min(stop, ends[s]) - pos
        if take > 0:
            out.append((s, pos - shard_start, take))
            pos += take
        s += 1
    return out


class EvalPass(IterableDataset):
    def __init__(self, spec: ShardSpec, *, batch_size: int, rank: int, world_size: int, strict: bool):
        self.spec = spec.with_counts()
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.strict = strict

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        spec, bs = self.spec, self.batch_size
        stats = SkipStats(self.strict)
        assembler = BatchAssembler(spec, stats, with_keys=True)
        a, b = rank_range(spec.num_samples, self.rank, self.world_size)
        jb, je = worker_batches(-(-(b - a) // bs), w, k)
        start, stop = a + jb * bs, min(a + je * bs, b)
        pending: list[dict] = []  # good samples of the batch being built
        slots = 0  # positions of that batch consumed, good or bad
        starts = [0, *accumulate(spec.counts)]
        for shard, offset, length in pieces(spec.counts, start, stop):
            url = spec.urls[shard]
            seen = 0
            read = ShardRead(url, stats, skip=offset, limit=length, limits=spec.limits)
            for sample in read:
                sample["__pos__"] = starts[shard] + offset + seen
                seen += 1
                if check_sample(sample, spec, stats):
                    pending.append(sample)
                slots += 1
                if slots == bs:
                    yield from self._emit(assembler, pending, stats)
                    pending, slots = [], 0
            if seen < length:
                if not read.damaged:  # a damaged shard was counted once already, as bad_shard
                    stats.skip("short_shard", url, None,
                               f"ends {length - seen} sample(s) before the count in the manifest")
                # Keep batch boundaries where every other worker and rank expects them.
                slots += length - seen
                while slots >= bs:
                    slots -= bs
                    yield from self._emit(assembler, pending, stats)
                    pending = []
        if slots:
            yield from self._emit(assembler, pending, stats)
        delta = stats.take_delta()
        if delta:
            yield {"_stats": delta}

    @staticmethod
    def _emit(assembler: BatchAssembler, samples: list[dict], stats: SkipStats):
        batch = assembler.start(len(samples))
        assembler.put_many(batch, samples)
        if batch["rows"]:  # a batch of only bad samples is dropped, not sent empty
            out = assembler.finish(batch)
            stats.samples += batch["rows"]
            out["_stats"] = stats.take_delta()
            yield out
