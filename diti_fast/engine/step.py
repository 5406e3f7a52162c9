"""One optimiser step, written once: forward, loss, backward, optimiser, EMA, non-finite skip.

:class:`StepBody` is the step over ``deepspeed.grad_accum`` micro-batches. It runs with one of two
drivers, which differ only in who does forward, backward and the optimiser update:

* :class:`DeepSpeedDriver`: DeepSpeed's engine (its backward hooks average the gradients over
  ranks; ZeRO-1/2 partition them; ``optim.grad_clip`` clips them). Runs eagerly.
* :class:`GraphSafeDriver`: the objective itself, ``(loss / grad_accum).backward()``, one flat
  all-reduce of the gradients and the fused, capturable Adam: nothing reads a value back to the
  host, so engine/graph_step.py can record the whole body as one CUDA graph.

Per step, in both: the micro-batches' global sample indices (which key t and ε) come from the
device step counter through :func:`noise.first_index`; the loss-finite flag is and-ed over the
micro-batches, agreed on by every rank (all-reduce MIN) and handed to fused Adam as ``found_inf``,
which then leaves weights, moments and step count untouched; the EMA weight comes from
:func:`ema.step_weight` (0 on a skipped step); the meter accumulates on the device.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from diti_fast.data.model_input import to_model_input
from diti_fast.engine.distributed import Ranks
from diti_fast.engine.ema import EMA, step_weight
from diti_fast.engine.faults import Faults
from diti_fast.engine.metrics import Meter
from diti_fast.engine.noise import first_index
from diti_fast.engine.run_config import TrainConfig


class DeepSpeedDriver:
    """Forward, backward and update through DeepSpeed's engine."""

    def __init__(self, engine):
        self.engine = engine

    def forward(self, x0: torch.Tensor, index: torch.Tensor):
        return self.engine(x0, index)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)  # divides by grad_accum; averages over ranks at the boundary
        if not last:
            self.engine.step()      # between micro-batches: DeepSpeed's counters only

    def reduce_gradients(self) -> None:
        pass  # done by DeepSpeed's backward at the accumulation boundary

    def update(self) -> None:
        self.engine.step()


class GraphSafeDriver:
    """Forward, backward and update with no host reads: capturable as one CUDA graph."""

    def __init__(self, objective, opt: torch.optim.Optimizer, accum: int, world: int):
        self.objective, self.opt, self.accum, self.world = objective, opt, accum, world

    def forward(self, x0: torch.Tensor, index: torch.Tensor):
        return self.objective(x0, index)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.accum).backward()  # DeepSpeed divides by grad_accum too (exact for 1)

    def reduce_gradients(self) -> None:
        """Sum over ranks, then × 1/world: DeepSpeed ZeRO-0's all-reduce arithmetic, one flat buffer
        per dtype (flatten and copy back are captured with the rest)."""
        if self.world == 1:
            return
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat.mul_(1.0 / self.world)
            for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                g.copy_(synced)

    def update(self) -> None:
        self.opt.step()


class StepBody:
    """The step's device work; ``__call__(batch)`` runs one optimiser step, ``batch(m)`` giving
    micro-batch ``m`` as uint8 images. The state it carries across steps lives in fixed device
    tensors (step counter, ``found_inf``, the step's flag), so a CUDA graph of it stays valid."""

    def __init__(self, cfg: TrainConfig, driver, opt: torch.optim.Optimizer, ema: EMA, meter: Meter,
                 faults: Faults, ranks: Ranks, start_step: int):
        self.cfg, self.driver, self.ema, self.meter, self.faults = cfg, driver, ema, meter, faults
        self.ranks, self.device, self.accum = ranks, ranks.device, cfg.deepspeed.grad_accum
        device = ranks.device
        self.positions = torch.arange(ranks.micro, device=device)
        self.steps_done = torch.full((), start_step, dtype=torch.int64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)       # the last step's flag
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        opt.found_inf = self.found_inf  # fused Adam reads it at every step (also inside a graph)
        self.x0: torch.Tensor | None = None  # the last micro-batch in model space (training visuals)

    def __call__(self, batch: Callable[[int], torch.Tensor]) -> torch.Tensor:
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for m in range(self.accum):
            r = self.ranks
            first = first_index(self.steps_done, self.cfg.data.batch_size, r.rank, r.world, m, r.micro)
            self.x0 = to_model_input(batch(m), self.device)
            out, t = self.driver.forward(self.x0, first + self.positions)
            out = self.faults.poison(out)
            finite &= torch.isfinite(out.loss.detach())
            self.meter.add_samples(out.per_sample, t, out.buckets)
            self.driver.backward(out.loss, last=m == self.accum - 1)
        self.driver.reduce_gradients()
        if self.ranks.world > 1:
            # A NaN on any rank poisons the averaged gradient everywhere: agree on the flag (a
            # device collective, not a host sync); fused Adam then skips the update on the device.
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        self.found_inf.copy_((~finite).to(torch.float32))
        self.driver.update()
        e = self.cfg.ema
        self.ema.update(step_weight(self.steps_done, finite, e.decay, e.every, e.warmup))
        self.meter.add_step(finite)
        self.steps_done += 1
        self.finite.copy_(finite)
        return self.finite


class EagerStep:
    """DeepSpeed's step, uncaptured: micro-batches straight from the data stream."""

    def __init__(self, body: StepBody, data):
        self.body, self.data = body, data

    @property
    def x0(self) -> torch.Tensor | None:
        return self.body.x0

    def step(self, step: int) -> torch.Tensor:
        self.body.faults.before_step(step)
        return self.body(self.data.next)
