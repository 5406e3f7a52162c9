"""Launch budget of one training step: how many kernels the engine's step asks the device for.

    pytest benchmarks/bench_launch_budget.py --benchmark-enable --benchmark-only \\
        --benchmark-json=benchmarks/results/launch-budget-$(date +%Y-%m-%d).json

At the users' per-GPU batch (16 images) an eager step is bound by kernel launches (~5 µs of host
time each), not by arithmetic, which is why the engine captures the step as one CUDA graph. This
file counts, for each preset's DiTi step (forward, backward, fused Adam, EMA, metrics: the step
exactly as ``engine/graph_step.py`` runs it), with and without the fused kernels:

* ``eager_ops``: aten ops that launch a kernel (views excluded), counted by a TorchDispatchMode
  (benchmarks/op_census.py), plus Triton kernel launches of the fused kernels. On a CPU the
  Triton kernels are not executed here (their launches are counted and skipped: no value of the
  step steers the host, so the count does not depend on them); everything else runs for real.
* ``compiled_kernels`` (only with ``LAUNCH_BUDGET_COMPILE=1``, minutes per preset on a CPU):
  the forward and backward compiled by Inductor, ``generated_kernel_count`` of those graphs, plus
  the convolutions and matmuls that Inductor leaves to cuDNN/cuBLAS (counted in the eager step),
  plus the eager ops outside the model (Adam, EMA, metrics). Inductor on a CPU writes C++
  kernels, which fuse somewhat differently from the Triton kernels it writes for a GPU. Not yet
  a trustworthy launch count: a trial on shapes32 came out above the eager count (see
  docs/performance.md).

The count does not depend on the batch size, so the step runs at batch 2. Results go to the
benchmark's ``extra_info``; the table in docs/performance.md was made from them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_census import OpCensus  # noqa: E402

from diti_fast.engine.distributed import Ranks  # noqa: E402
from diti_fast.engine.ema import EMA  # noqa: E402
from diti_fast.engine.graph_step import GraphStep, StepPlan  # noqa: E402
from diti_fast.engine.metrics import Meter  # noqa: E402
from diti_fast.engine.objective import Objective  # noqa: E402
from diti_fast.engine.config_files import load_config  # noqa: E402

PRESETS = ["shapes32", "celeba64", "ffhq128", "bedroom128"]
BATCH = 2
COMPILE = os.environ.get("LAUNCH_BUDGET_COMPILE") == "1"
EXTERN = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"}


class _CountedLaunch:
    """Stands in for a Triton kernel object: ``kernel[grid](...)`` counts instead of launching."""

    def __init__(self, name: str, tally: dict):
        self.name, self.tally = name, tally

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tally[self.name] = self.tally.get(self.name, 0) + 1
        return launch


@pytest.fixture
def triton_counted(monkeypatch):
    """Route the fused ops to their Triton path on any device, with launches counted, not run."""
    from diti_fast.kernels import fused_loss, fused_norm
    tally: dict[str, int] = {}
    for mod in (fused_norm, fused_loss):
        monkeypatch.setattr(mod, "use_triton", lambda t: True)
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                monkeypatch.setattr(mod, name, _CountedLaunch(name, tally))
    return tally


class _Batches:
    def __init__(self, batch):
        self.batch = batch

    def next(self, micro_step):
        return self.batch


def _step_runner(preset: str, fused: bool) -> tuple[GraphStep, Objective]:
    flag = str(fused).lower()
    cfg = load_config(preset, ["data.source=fixed", f"data.batch_size={BATCH}", f"fast.fused_norm={flag}",
                               f"fast.fused_loss={flag}", "fast.compile=false", "deepspeed.grad_accum=1"])
    dev = torch.device("cpu")
    torch.manual_seed(0)
    obj = Objective(cfg, dev, autocast=False).train()
    obj.channels_last_weights()
    trainable = obj.trainable()
    opt = torch.optim.Adam([p for _, p in trainable], lr=1e-4, fused=True)
    ema, meter = EMA(trainable, cfg.ema.decay), Meter(cfg.log.t_buckets, cfg.model.diffusion.timesteps, dev)
    size = cfg.image_size()
    batch = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8)
    return GraphStep(StepPlan(True, False, None), cfg, obj, opt, ema, meter, _Batches(batch), Ranks(0, 1, dev, BATCH), 0), obj


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("preset", PRESETS)
def test_launch_budget(benchmark, preset, fused, triton_counted):
    runner, obj = _step_runner(preset, fused)
    runner.step(0)  # lazy caches (noise counters), optimiser state
    triton_counted.clear()
    with OpCensus() as census:
        runner.step(1)
    triton = sum(triton_counted.values())
    info = {"preset": preset, "fused_kernels": fused, "batch": BATCH, "device": "cpu",
            "eager_aten_ops": census.total, "eager_triton_launches": triton,
            "eager_ops": census.total + triton, "layout_copies": len(census.layout_copies),
            "top_ops": dict(census.ops.most_common(12))}
    if COMPILE:
        info.update(_compiled_count(runner, obj, census))
    benchmark.extra_info.update(info)
    benchmark.pedantic(runner.step, args=(2,), rounds=1, iterations=1)
    assert census.total > 100 and (triton > 0) == fused


def _compiled_count(runner: GraphStep, obj: Objective, census: OpCensus) -> dict:
    import torch._inductor.metrics as metrics
    torch._dynamo.reset()
    metrics.reset()
    size = runner.raw[0].shape[-1]
    runner.opt.zero_grad(set_to_none=True)  # as in the step: no gradient accumulation ops
    with OpCensus() as model_ops:  # the model part of the eager step alone, for the rest-of-step count
        out, _ = obj(torch.zeros(BATCH, 3, size, size), torch.arange(BATCH))
        out.loss.backward()
    obj.compile()
    runner.step(3)  # compiles forward and backward
    generated = metrics.generated_kernel_count
    extern = sum(n for op, n in model_ops.ops.items() if op in EXTERN)
    rest = census.total - model_ops.total
    return {"compiled_generated_kernels": generated, "compiled_extern_kernels": extern,
            "compiled_rest_of_step_ops": rest, "compiled_kernels": generated + extern + rest}
