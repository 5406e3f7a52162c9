"""The whole optimiser step as one CUDA graph: forward, backward, Adam, EMA and metrics, replayed.

Why: at a per-GPU batch of 16 images, one eager DiTi step issues about two
thousand kernel launches; at ~5 µs of host time each that is longer than the GPU needs for the
arithmetic, so the step is bound by launches. A CUDA graph records the step's kernels once and
replays them with a single launch.

The step's body is engine/step.py's, the one DeepSpeed's eager step runs too, with its graph-safe
driver. What makes it replayable (and what differs from DeepSpeed's own step):

* static inputs (this module): the micro-batches are copied into fixed device buffers (uint8, converted inside
  the graph); the global sample indices that key t and ε are computed on the device from a step
  counter, so t and ε are drawn inside the graph, exactly as ``noise.py`` draws them eagerly;
* the loss-finite flag is computed, all-reduced (multi-rank) and handed to fused Adam as
  ``found_inf`` on the device: a non-finite step still leaves weights, moments and step count
  untouched, inside the graph;
* Adam is the fused implementation with ``capturable=True`` (its step count lives on the device);
* the EMA weight, decay warm-up and ``ema.every`` included, is computed on the device from the
  step counter and multiplied by the flag (a Python float would be frozen into the graph);
* gradients are averaged over ranks by the driver (one flat all-reduce, then × 1/world, the same
  arithmetic as DeepSpeed's ZeRO-0 all-reduce) instead of by DeepSpeed's backward hooks.

Which launches can be captured: ZeRO stage 0 (DeepSpeed then only wraps the model; the step is
ours). ZeRO-1/2 reduce-scatter gradients from backward hooks with host-side bucket bookkeeping
and read values back to the host, which a graph cannot replay: those run DeepSpeed's eager step.
So does ``optim.grad_clip > 0`` (DeepSpeed's clipping). The models of this project fit on one
GPU many times over (celeba64: 53 M trainable parameters, ffhq128: 82 M; fp32 weights, gradients
and Adam moments under 1.5 GB), so ZeRO-0 is the presets' default and the fastest correct path.
Where capture is impossible the run says why in one line and falls back; so does a capture that
fails when attempted (GraphStep._try_capture), from then on running the same body uncaptured.

On a CPU (tests) ``fast.cuda_graph=true`` runs the same graph-safe step without capturing it:
that is how the CPU tests show it equals DeepSpeed's step bit for bit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diti_fast.engine.distributed import Ranks
from diti_fast.engine.faults import Faults
from diti_fast.engine.run_config import TrainConfig
from diti_fast.engine.step import GraphSafeDriver, StepBody

WARMUP_STEPS = 3  # eager steps before capture: compile, cuDNN autotuning, allocator, lazy caches


@dataclass(frozen=True)
class StepPlan:
    graph_safe: bool      # run GraphStep (else DeepSpeed's own step)
    capture: bool         # ... and capture it as a CUDA graph (else run it eagerly)
    reason: str | None    # one line for the log when the request was not met in full


def capture_blocker(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why this run's step cannot be one CUDA graph (None: it can)."""
    if device.type != "cuda":
        return "no CUDA device"
    if cfg.deepspeed.zero_stage in (1, 2):
        return (f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: ZeRO-1/2 reduce gradients from backward "
                "hooks with host-side bookkeeping, which a CUDA graph cannot replay (ZeRO-0 can)")
    if cfg.optim.grad_clip > 0:
        return f"optim.grad_clip={cfg.optim.grad_clip:g}: DeepSpeed's gradient clipping is not capturable"
    return None


def plan_step(cfg: TrainConfig, device: torch.device) -> StepPlan:
    """How to run the step for ``fast.cuda_graph`` ("auto": capture where possible; true: also the
    uncaptured graph-safe step on a CPU; false: DeepSpeed's step)."""
    want = cfg.fast.cuda_graph
    if want is False:
        return StepPlan(False, False, None)
    why = capture_blocker(cfg, device)
    if why is None:
        return StepPlan(True, True, None)
    if why == "no CUDA device":
        if want is True:
            return StepPlan(True, False, "fast.cuda_graph=true without CUDA: the graph-safe step runs uncaptured")
        return StepPlan(False, False, None)  # auto on a CPU: nothing to report
    return StepPlan(False, False, f"fast.cuda_graph={want}: not capturing the step, {why}; running DeepSpeed's step")


class GraphStep:
    """The graph-safe step (engine/step.py's body with :class:`GraphSafeDriver`) over static buffers.

    ``step(step)`` fills the buffers from ``data`` (host side), then runs the body: eagerly for
    the first ``WARMUP_STEPS`` calls or when not capturing, captured on the next call and replayed
    from then on (eagerly from then on if the capture fails). It returns the step's all-rank "loss
    was finite" flag (a device tensor)."""

    def __init__(self, plan: StepPlan, cfg: TrainConfig, objective, opt: torch.optim.Optimizer, ema, meter, data,
                 ranks: Ranks, start_step: int, faults: Faults | None = None):
        self.capture, self.cfg, self.objective, self.opt, self.data = plan.capture, cfg, objective, opt, data
        self.accum, self.device = cfg.deepspeed.grad_accum, ranks.device
        self.faults = faults if faults is not None else Faults(cfg, ranks)
        driver = GraphSafeDriver(objective, opt, self.accum, ranks.world)
        self.body = StepBody(cfg, driver, opt, ema, meter, self.faults, ranks, start_step)
        self.raw: list[torch.Tensor] | None = None  # per micro-step [micro, C, H, W] uint8, on first fill
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        if plan.capture:
            # The autocast weight cache would hold casts made during capture across replays.
            objective.autocast_cache = False

    @property
    def x0(self) -> torch.Tensor | None:
        return self.body.x0

    # ---- host side
    def _fill(self, step: int) -> None:
        for m in range(self.accum):
            batch = self.data.next(m)
            if self.raw is None:
                # In the models' layout: the layout change happens in this copy, not in the graph.
                fmt = torch.channels_last if self.objective.channels_last else torch.contiguous_format
                self.raw = [torch.empty(batch.shape, dtype=torch.uint8, device=self.device, memory_format=fmt)
                            for _ in range(self.accum)]
            self.raw[m].copy_(batch, non_blocking=True)
        self.faults.before_step(step)

    def step(self, step: int) -> torch.Tensor:
        self._fill(step)
        if self.capture and self.graph is None and self.calls >= WARMUP_STEPS:
            self.graph = self._try_capture()  # None: capture failed, the step runs eagerly from now on
        if self.graph is not None:
            self.graph.replay()
        else:
            with self._side_stream():
                self.opt.zero_grad(set_to_none=True)  # as DeepSpeed's step leaves them
                self._body()
        self.calls += 1
        return self.body.finite

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm-up steps before a capture run off the default stream, as capture wants (CUDA only)."""
        if not (self.capture and self.device.type == "cuda"):
            yield
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _try_capture(self) -> torch.cuda.CUDAGraph | None:
        """Capture the body; on any failure say why in one line and fall back to the uncaptured step.

        Work recorded during a capture does not run, so the weights, Adam moments and step counts,
        the EMA, the meter and the step counter are as they were before the attempt. What the
        attempt leaves on the host side is put back: gradients (allocated in the graph's pool), the
        autocast weight cache (off only for capture), the CUDA generator's offset."""
        # Gradients None at capture: the graph's backward allocates them in its own pool,
        # and every replay writes them afresh (no accumulation across steps).
        self.opt.zero_grad(set_to_none=True)
        rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            return self._capture()
        except Exception as e:  # noqa: BLE001 - any capture failure: the eager step is always correct
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"[diti-fast] CUDA graph capture failed ({type(e).__name__}: {first}); "
                  "running the step eagerly from now on", flush=True)
        self.capture = False
        self.opt.zero_grad(set_to_none=True)
        self.objective.autocast_cache = True
        self.body.x0 = None
        if rng is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.set_rng_state(rng, self.device)
        return None

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record the body as one CUDA graph. Thread-local capture mode: CUDA calls that other
        threads make meanwhile (a DataLoader's pin-memory thread) neither fail nor invalidate it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()
        return graph

    def _body(self) -> None:
        """The shared step body over the static buffers (device only: no host reads)."""
        self.body(self.raw.__getitem__)
