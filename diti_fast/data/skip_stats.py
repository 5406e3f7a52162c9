"""Counting skipped samples, in workers and across them, and the one end-of-epoch warning."""

from __future__ import annotations

import warnings
from collections import Counter

from .errors import CorruptSampleError, DataWarning

MAX_EXAMPLES = 3


class SkipStats:
    """Skips by reason plus a few example messages. ``strict`` turns the first skip into an error.

    Workers ship their counts to the main process as deltas attached to batches
    (``take_delta``/``merge``), so the summary covers every worker.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter = Counter()
        self.examples: list[str] = []
        self.samples = 0
        self.batches = 0
        self._sent: Counter = Counter()
        self._sent_examples = 0

    def skip(self, reason: str, url: str, key: str | None, detail: str) -> None:
        msg = f"{url}: sample {key}: {detail}" if key is not None else f"{url}: {detail}"
        if self.strict:
            raise CorruptSampleError(f"{msg} [{reason}] (strict mode)")
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
