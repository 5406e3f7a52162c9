"""The ``debug`` section's fault injection and sample log, behind one object the loop calls.

What the resilience tests inject, each keyed by the optimiser step it acts on:

* ``debug.nan_at_steps`` / ``debug.nan_rank``: the loss of those steps is multiplied by NaN on the
  chosen rank (-1: every rank). Every step multiplies by a device scalar holding 1.0 or NaN, so
  the same arithmetic is recorded once in a CUDA graph and still poisons the right steps (× 1.0 is
  exact);
* ``debug.crash_at_step`` (exit 99 with no checkpoint), ``debug.signal_at_step`` (SIGTERM to this
  process), ``debug.step_sleep_s`` (a pause after every step), ``debug.hold_after_step`` (wait for a
  stop signal after that step);
* ``debug.sample_log``: the global sample indices each rank trains (see sample_log.py).

``debug.fail_save_rank`` acts inside the checkpoint writer (checkpoints.py).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from diti_fast.engine.distributed import Ranks
from diti_fast.engine.noise import first_index
from diti_fast.engine.run_config import TrainConfig
from diti_fast.engine.sample_log import SampleLog
from diti_fast.engine.stopping import StopSignal, hold_for_signal
from diti_fast.losses import LossOut


class Faults:
    def __init__(self, cfg: TrainConfig, ranks: Ranks, run_dir: Path | None = None, stop: StopSignal | None = None):
        d = cfg.debug
        self.cfg, self.ranks, self.stop = cfg, ranks, stop
        self.nan_steps = set(d.nan_at_steps) if d.nan_rank in (-1, ranks.rank) else set()
        self.scale = torch.ones((), dtype=torch.float32, device=ranks.device) if d.nan_at_steps else None
        self.samples = (SampleLog(run_dir, ranks.rank, ranks.world) if d.sample_log and run_dir is not None
                        else None)

    def before_step(self, step: int) -> None:
        """Host side, before step ``step + 1`` runs (``step`` steps done)."""
        if self.samples is not None:
            r = self.ranks
            for m in range(self.cfg.deepspeed.grad_accum):
                self.samples.add(step + 1, first_index(step, self.cfg.data.batch_size, r.rank, r.world, m, r.micro),
                                 r.micro)
        if self.scale is not None:
            self.scale.fill_(float("nan") if step + 1 in self.nan_steps else 1.0)

    def poison(self, out: LossOut) -> LossOut:
        """Inside the step: the loss × the current scale (1.0, or NaN on a ``nan_at_steps`` step)."""
        p = self.scale
        if p is None:
            return out
        return LossOut(out.loss * p, out.per_sample * p, out.buckets and (out.buckets[0] * p, out.buckets[1]))

    def after_step(self, step: int) -> None:
        """Host side, after step ``step`` (1-based) and its logging, before any checkpoint."""
        d = self.cfg.debug
        if d.crash_at_step and step == d.crash_at_step:
            raise SystemExit(99)
        if d.signal_at_step and step == d.signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if d.step_sleep_s:
            time.sleep(d.step_sleep_s)
        if d.hold_after_step and step == d.hold_after_step:
            hold_for_signal(self.stop, self.ranks.world)

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
