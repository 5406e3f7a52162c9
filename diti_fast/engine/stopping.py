"""When the loop stops early: SIGTERM/SIGINT and the time limit, agreed on by every rank."""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls; a second SIGINT interrupts at once.

    Launchers forward a SIGTERM to every rank (torchrun and deepspeed's launcher, then SIGKILL after
    30 s; SLURM to every process of the job, DataLoader workers included, which ignore it: see
    diti_fast/data/loader.py). The ranks receive it at slightly different steps and agree on one
    in :func:`stop_reason`. Constructing it is collective with several ranks (a process group)."""

    def __init__(self, enabled: bool = True, world: int = 1):
        self.pending: int | None = None
        self._previous = {}
        # The agreement all-reduces two host integers: through NCCL they would have to go to the
        # device and back (a device sync per agreement); a gloo group of the same ranks keeps them
        # on the host, so agreeing every step costs a small host-to-host message.
        self.group = None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
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


def stop_reason(stop: StopSignal, deadline: float | None, step: int, world: int, sync_every: int) -> str | None:
    """"signal", "time_limit" or None. Ranks must stop at the same step, so with several ranks the
    host flags are all-reduced every ``sync_every`` steps; alone, every step."""
    flags = [int(stop.pending is not None), int(deadline is not None and time.monotonic() > deadline)]
    if world > 1:
        if step % sync_every:
            return None
        t = torch.tensor(flags)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=stop.group)
        flags = t.tolist()
    return "signal" if flags[0] else "time_limit" if flags[1] else None


def hold_for_signal(stop: StopSignal, world: int, timeout_s: float = 600.0) -> None:
    """``debug.hold_after_step``: wait until some rank has a stop signal pending, so a signal test
    knows the step the run stops at. Every rank polls in the same collective, so all leave at the
    same poll (a timeout on any rank also ends it for all)."""
    deadline = time.monotonic() + timeout_s
    while True:
        flags = [int(stop.pending is not None), int(time.monotonic() > deadline)]
        if world > 1:
            t = torch.tensor(flags)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=stop.group)
            flags = t.tolist()
        if any(flags):
            return
        time.sleep(0.05)
