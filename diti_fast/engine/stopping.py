"""When the loop stops early: SIGTERM/SIGINT and the time limit, agreed on by every rank."""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls; a second SIGINT interrupts at once."""

    def __init__(self, enabled: bool = True):
        self.pending: int | None = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave the default behaviour
                    pass

    def _handle(self, signum, frame):
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.pending = signum

    def close(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def stop_reason(stop: StopSignal, deadline: float | None, step: int, world: int, sync_every: int,
                device) -> str | None:
    """"signal", "time_limit" or None. Ranks must stop at the same step, so with several ranks the
    flags are all-reduced every ``sync_every`` steps (a sync); alone, every step."""
    flags = [int(stop.pending is not None), int(deadline is not None and time.monotonic() > deadline)]
    if world > 1:
        if step % sync_every:
            return None
        t = torch.tensor(flags, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = t.tolist()
    return "signal" if flags[0] else "time_limit" if flags[1] else None
