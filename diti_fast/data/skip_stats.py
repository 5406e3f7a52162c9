"""Counting skipped samples by cause, in workers and across them; the stall guard; the one
end-of-epoch warning.

Causes (the keys of ``skipped_by_reason`` and of the engine's ``data_skipped`` metric):

    decode         an image member that does not decode (or raw bytes of no square size)
    size           an image of another size, with ``size_mismatch="skip"``
    missing_image  a sample without any image member
    missing_label  a labelled set's sample without a label member (or a json key)
    bad_label      a label member that does not parse or does not fit the attributes
    bad_shard      a shard that cannot be opened, fails to download, or is damaged part-way
                   (counted once per read; the samples before the damage are kept)
    short_shard    a shard that ends cleanly before its manifest count (evaluation)
"""

from __future__ import annotations

import warnings
from collections import Counter

from .errors import CorruptSampleError, DataError, DataWarning

MAX_EXAMPLES = 3
REASONS = ("decode", "size", "missing_image", "missing_label", "bad_label", "bad_shard", "short_shard")
DEFAULT_MAX_CONSECUTIVE_SKIPS = 1000


class SkipStats:
    """Skips by reason plus a few example messages. ``strict`` turns the first skip into an error.

    Workers ship their counts to the main process as deltas attached to batches
    (``take_delta``/``merge``), so the summary covers every worker. While ``muted`` (a training
    stream reading past batches another worker emits, or that a resumed run already did), skips
    are not counted, so every skipped sample is counted exactly once whatever the worker count.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.muted = False
        self.guard: StallGuard | None = None
        self.counts: Counter = Counter()
        self.examples: list[str] = []
        self.samples = 0
        self.batches = 0
        self._sent: Counter = Counter()
        self._sent_examples = 0

    def skip(self, reason: str, url: str, key: str | None, detail: str) -> None:
        assert reason in REASONS, reason
        msg = f"{url}: sample {key}: {detail}" if key is not None else f"{url}: {detail}"
        if self.strict:
            raise CorruptSampleError(f"{msg} [{reason}] (strict mode)")
        if self.guard is not None:
            self.guard.bad(reason, msg)
        if self.muted:
            return
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(msg)

    def take_delta(self) -> dict | None:
        delta = self.counts - self._sent
        if not delta:
            return None
        out = {"counts": dict(delta), "examples": self.examples[self._sent_examples:]}
        self._sent = Counter(self.counts)
        self._sent_examples = len(self.examples)
        return out

    def merge(self, delta: dict) -> None:
        self.counts.update(delta["counts"])
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(delta["examples"][:room])

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "batches": self.batches,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.counts),
            "examples": list(self.examples),
        }

    def warn_summary(self, label: str) -> None:
        if not self.counts:
            return
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        warnings.warn(
            f"{label}: skipped {self.skipped} bad sample(s) ({reasons}) after {self.samples} good ones; "
            f"first: {self.examples[0] if self.examples else '?'}",
            DataWarning,
            stacklevel=3,
        )


class StallGuard:
    """Stops a stream that keeps failing: ``limit`` attempts in a row (samples skipped for any cause,
    decode failures included, and shards that yield nothing) without one usable sample raise a
    DataError naming the last shard and cause, instead of spinning forever."""

    def __init__(self, limit: int = DEFAULT_MAX_CONSECUTIVE_SKIPS):
        self.limit = max(1, limit)
        self.run = 0

    def good(self) -> None:
        self.run = 0

    def bad(self, reason: str, msg: str) -> None:
        self.run += 1
        if self.run >= self.limit:
            raise DataError(f"no usable sample in {self.run} attempts in a row (data.max_consecutive_skips="
                            f"{self.limit}); last: {msg} [{reason}]")
