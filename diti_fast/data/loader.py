"""``train_loader`` / ``eval_loader``: the objects the engine iterates once per epoch."""

from __future__ import annotations

import atexit
import dataclasses
import signal
import warnings
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import DataError, DataWarning
from .eval_pass import EvalPass, num_rank_batches
from .shard_reader import DEFAULT_LIMITS
from .shard_spec import ShardSpec
from .skip_stats import SkipStats
from .train_stream import TrainStream, read_amplification

DEFAULT_STREAMS = 8

# Worker-backed iterators still open. Our workers ignore SIGTERM (see _ignore_stop_signals), so
# multiprocessing's exit hook, which terminates daemonic children with SIGTERM and then joins them,
# would wait forever on one whose iterator outlived the program, e.g. held by the traceback of an
# uncaught exception. This hook runs first (atexit is last-in, first-out; it is registered after
# multiprocessing's) and stops them the way an exhausted iterator does.
_OPEN_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()
_exit_hook_registered = False


def _shutdown_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _track(it) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_shutdown_open_iterators)
        _exit_hook_registered = True
    _OPEN_ITERATORS.add(it)


class BatchLoader:
    """Iterates the batches of one epoch (one rank), collecting worker skip counts into
    ``.stats`` and issuing one ``DataWarning`` summary when the epoch ends with skips."""

    def __init__(self, dataset: IterableDataset, *, num_batches: int, num_workers: int, label: str,
                 strict: bool, pin_memory: bool | None, prefetch_factor: int | None):
        self.dataset = dataset
        self.num_batches = num_batches
        self.num_workers = num_workers
        self.label = label
        self.strict = strict
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.stats: dict = SkipStats().as_dict()

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> Iterator[dict]:
        if self.num_workers == 0:
            # In-process: no DataLoader, so no per-batch conversion pass either.
            for item in self.dataset:
                if self.pin_memory and "image" in item:
                    item["image"] = item["image"].pin_memory()
                yield item
            return
        batches = iter(DataLoader(
            self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
            # Each new iterator draws a base seed from this generator: the global one would shift
            # the trainer's dropout stream at every epoch start (and a resumed run's at another
            # point). The streams seed themselves from (seed, epoch, rank, ...) and ignore it.
            generator=torch.Generator(),
        ))
        _track(batches)
        try:
            yield from batches
        finally:
            # Stop workers now, also on an error or an early break: left to the garbage collector
            # (a traceback keeps the iterator alive), torch's shutdown waits 5 s per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __iter__(self) -> Iterator[dict]:
        stats = SkipStats(self.strict)
        self.stats = stats.as_dict()
        for item in self._batches():
            delta = item.pop("_stats", None)
            if delta:
                stats.merge(delta)
            if "image" not in item:
                continue  # a worker's closing stats record
            item["index"] = torch.from_numpy(item["index"])
            if item["attrs"] is not None:
                item["attrs"] = torch.from_numpy(item["attrs"])
            stats.batches += 1
            stats.samples += len(item["image"])
            self.stats = stats.as_dict()
            yield item
        self.stats = stats.as_dict()
        stats.warn_summary(self.label)


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGTERM/SIGINT reach whole jobs (SLURM, the deepspeed launcher's process-tree kill, Ctrl-C).
    # The main process owns shutdown: it checkpoints, then stops its workers. A worker dying of
    # the signal first would make it fail with a DataLoader error instead. (A worker whose main
    # process is gone exits by itself: DataLoader workers watch their parent.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(batch):
    # Batches arrive whole; the default per-batch conversion would turn index/attrs into tensors
    # inside the worker, each then needing its own shared-memory segment.
    return batch


def _check(batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if num_workers < 0:
        raise ValueError("num_workers must be >= 0")


def prepare_spec(shards, *, image_size: int | None = None, size_mismatch: str | None = None,
                 resample: str | None = None, verify: bool = False,
                 max_consecutive_skips: int | None = None, stream_timeout_s: float | None = None,
                 stream_stall_s: float | None = None) -> ShardSpec:
    """Resolve ``shards`` and set how to read them: ``image_size`` (default: the set's own),
    ``size_mismatch`` ("resize": center crop + ``resample`` filter, "skip", "error"), ``verify``
    (sha256 of every shard against the manifest before reading; a mismatch is a DataError naming
    the shard), ``max_consecutive_skips`` (the stall limit), ``stream_timeout_s`` / ``stream_stall_s``
    (an http(s) shard's download: the most seconds in all, and without progress; ``StreamLimits``)."""
    limits = None  # a ShardSpec keeps its own; anything else gets the defaults
    if stream_timeout_s is not None or stream_stall_s is not None:
        if (stream_timeout_s is not None and stream_timeout_s <= 0) or (stream_stall_s is not None and stream_stall_s <= 0):
            raise ValueError(f"stream_timeout_s and stream_stall_s must be > 0, got {stream_timeout_s}, {stream_stall_s}")
        limits = dataclasses.replace(DEFAULT_LIMITS, **{k: v for k, v in dict(
            timeout_s=stream_timeout_s, stall_s=stream_stall_s).items() if v is not None})
    spec = ShardSpec.resolve(shards, limits or DEFAULT_LIMITS).reading(image_size=image_size, size_mismatch=size_mismatch,
                                                      resample=resample, max_consecutive_skips=max_consecutive_skips,
                                                      limits=limits)
    if verify:
        spec.verify_sha256()
    return spec


def train_loader(shards, batch_size: int, seed: int = 0, epoch_samples: int | None = None, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, hflip: bool = True, start_epoch: int = 0,
                 skip_batches: int = 0, shuffle_buffer: int = 1000, strict: bool = False, *,
                 streams: int = DEFAULT_STREAMS, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None, **reading) -> BatchLoader:
    """Batches of one training epoch for this rank: ``epoch_samples // world_size // batch_size``
    batches (drop-last), each ``dict(image=uint8 [B,3,H,W], index=int64 [B], attrs=float32 [B,A] | None)``.

    The stream is a deterministic function of (seed, start_epoch, rank, world_size, streams),
    independent of ``num_workers``; ``skip_batches=m`` resumes after the first m batches by
    reading past them without decoding. ``shuffle_buffer`` is the number of samples this rank
    holds for shuffling (split over the ``streams`` virtual streams): it bounds loader memory.
    ``epoch_samples`` defaults to the set's size (without a manifest: one counting pass).
    ``reading``: the options of ``prepare_spec``.
    """
    _check(batch_size, rank, world_size, num_workers)
    spec = prepare_spec(shards, **reading)
    if epoch_samples is None:
        epoch_samples = spec.with_counts().num_samples
    if streams < 1:
        raise ValueError("streams must be >= 1")
    if not spec.urls or spec.num_samples == 0:
        raise DataError(f"train_loader: the shard set {shards!r} holds no samples")
    num_batches = epoch_samples // world_size // batch_size
    if num_batches == 0:
        warnings.warn(f"train_loader: epoch_samples={epoch_samples} gives no full batch of {batch_size} "
                      f"on {world_size} rank(s); the epoch is empty", DataWarning, stacklevel=2)
    units = world_size * max(1, num_workers)
    if len(spec.urls) < units:
        warnings.warn(
            f"train_loader: {len(spec.urls)} shard(s) for {world_size} rank(s) × {max(1, num_workers)} worker(s); "
            "shards are resampled with replacement, so every worker still gets data, but concurrent streams "
            "read the same shards (more shards give better mixing)", DataWarning, stacklevel=2)
    amp = read_amplification(num_workers, streams)
    if amp > 1:
        warnings.warn(
            f"train_loader: num_workers={num_workers} does not divide streams={streams}; each sample is read "
            f"{amp}x (decoded once). Use a worker count dividing {streams}, or set streams", DataWarning, stacklevel=2)
    skip_batches = max(0, min(skip_batches, num_batches))
    dataset = TrainStream(spec, batch_size=batch_size, num_batches=num_batches, seed=seed, epoch=start_epoch,
                          rank=rank, world_size=world_size, streams=streams, shuffle_buffer=shuffle_buffer,
                          hflip=hflip, skip_batches=skip_batches, strict=strict)
    return BatchLoader(dataset, num_batches=num_batches - skip_batches, num_workers=num_workers,
                       label=f"train epoch {start_epoch} rank {rank}", strict=strict,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def eval_loader(shards, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                strict: bool = False, *, pin_memory: bool | None = None,
                prefetch_factor: int | None = None, **reading) -> BatchLoader:
    """One finite pass, no shuffle, no flip: every sample exactly once across all ranks and
    workers. Batches: ``dict(image, index, attrs, key)``; a batch may be short at the end of a
    rank's range or where bad samples were skipped. ``.num_batches`` is this rank's (upper bound
    on) batch count, ``.max_batches`` the largest over ranks, for engines that pad collectives.
    ``reading``: the options of ``prepare_spec``.
    """
    _check(batch_size, rank, world_size, num_workers)
    spec = prepare_spec(shards, **reading).with_counts()
    units = world_size * max(1, num_workers)
    if len(spec.urls) < units:
        warnings.warn(
            f"eval_loader: {len(spec.urls)} shard(s) for {world_size} rank(s) × {max(1, num_workers)} worker(s); "
            "splitting by sample instead, so workers share shards and each reads only its own part",
            DataWarning, stacklevel=2)
    dataset = EvalPass(spec, batch_size=batch_size, rank=rank, world_size=world_size, strict=strict)
    n = spec.num_samples
    loader = BatchLoader(dataset, num_batches=num_rank_batches(n, rank, world_size, batch_size),
                         num_workers=num_workers, label=f"eval rank {rank}", strict=strict,
                         pin_memory=pin_memory, prefetch_factor=prefetch_factor)
    loader.max_batches = max(num_rank_batches(n, r, world_size, batch_size) for r in range(world_size))
    loader.num_samples = n
    return loader
