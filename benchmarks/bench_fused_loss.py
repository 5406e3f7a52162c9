"""DiTi loss forward+backward: fused Triton kernel vs eager vs torch.compile (pytest-benchmark).

    pytest benchmarks/bench_fused_loss.py --benchmark-enable --benchmark-only -s

Variants (all produce the loss and dL/dg; the first three also per-sample losses and bucket sums):

* ``eager``: :func:`diti_loss_ref` (torch ops, fp32 accumulation).
* ``compile``: ``torch.compile(diti_loss_ref)`` - Inductor's fusion of the same outputs.
* ``compile_loss_only``: ``torch.compile`` of the bare loss formula, no monitoring outputs: the
  cheapest thing Inductor is asked to do, so the strictest baseline.
* ``triton``: :func:`diti_loss` with ``check_t=False`` (no host sync), CUDA only. The interpreter
  would time Python, not the kernel, so on CPU it is skipped.
* ``compile_triton``: ``torch.compile`` of a function calling :func:`diti_loss`, i.e. the kernel
  as an engine that compiles its whole step sees it (validation at trace time only), CUDA only.

Each timed call runs ``INNER`` steps and synchronises once, so launch gaps count as they would in
training but the sync latency is amortised; inputs rotate over enough sets to exceed the L2 on a
GPU (an H200 has 50 MB of it). ``extra_info`` records the per-step time, the effective bandwidth
over the minimum traffic, and each variant's speed-up over ``compile`` / ``compile_loss_only``
(goal on an H200: triton >= 1.2x compile). ``-s`` prints a summary table at the end.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernel module must see this before its import; the triton variant is skipped anyway
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diti_fast.config import DiffusionConfig  # noqa: E402
from diti_fast.diffusion import make_schedule  # noqa: E402
from diti_fast.kernels.fused_loss import diti_loss, diti_loss_ref  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {"64px": (128, 3, 64, 64), "128px": (128, 3, 128, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INNER = 20 if CUDA else 2
VARIANTS = ["eager", "compile", "compile_loss_only", "triton", "compile_triton"]
SCHED = make_schedule(DiffusionConfig(), device=DEVICE)
_MEDIANS: dict[tuple[str, str], dict[str, float]] = {}


def _loss_only(eps, eps_hat, g, t, shift_coef, weight):
    view = (g.shape[0],) + (1,) * (g.ndim - 1)
    w, c = weight[t].view(view), shift_coef[t].view(view)
    return (w * (eps.float() - (eps_hat.float() + c * g.float())) ** 2).mean()


# dynamic=False: each (shape, dtype) gets its own specialised kernels, as a fixed training run would,
# instead of the dynamic-shape code automatic dynamism switches to after the second shape.
_compiled_ref = torch.compile(diti_loss_ref, dynamic=False)
_compiled_loss_only = torch.compile(_loss_only, dynamic=False)
_compiled_kernel = torch.compile(lambda *a: diti_loss(*a, check_t=False)[0], dynamic=False)


def _fn(variant):
    tables = (SCHED.shift_coef, SCHED.weight)
    if variant == "eager":
        return lambda e, eh, g, t: diti_loss_ref(e, eh, g, t, *tables, check_t=False)[0]
    if variant == "compile":
        return lambda e, eh, g, t: _compiled_ref(e, eh, g, t, *tables, check_t=False)[0]
    if variant == "compile_loss_only":
        return lambda e, eh, g, t: _compiled_loss_only(e, eh, g, t, *tables)
    if variant == "compile_triton":
        return lambda e, eh, g, t: _compiled_kernel(e, eh, g, t, *tables)
    return lambda e, eh, g, t: diti_loss(e, eh, g, t, *tables, check_t=False)[0]


def _input_sets(shape, dtype):
    per_set = 3 * math.prod(shape) * torch.finfo(dtype).bits // 8
    n = min(32, max(2, math.ceil(256e6 / per_set))) if CUDA else 2
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sets = []
    for _ in range(n):
        eps, eps_hat, g = (torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype) for _ in range(3))
        t = torch.randint(0, SCHED.timesteps, (shape[0],), generator=gen, device=DEVICE)
        sets.append((eps, eps_hat, g.requires_grad_(), t))
    return sets


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _MEDIANS:
        return
    print("\nDiTi loss fwd+bwd, per step (us) and speed-up of each variant over compile:")
    for (shape, dtype), row in _MEDIANS.items():
        base = row.get("compile")
        cells = [f"{v}={row[v] * 1e6:.0f}" + (f" ({base / row[v]:.2f}x)" if base else "")
                 for v in VARIANTS if v in row]
        print(f"  {shape:>6} {dtype:>4} [{DEVICE}]: " + ", ".join(cells))


@pytest.mark.parametrize("variant", VARIANTS)  # outermost: every baseline is timed before triton
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_diti_loss_fwd_bwd(benchmark, request, variant, dtype, shape):
    if variant in ("triton", "compile_triton") and not CUDA:
        pytest.skip("the Triton kernel runs only under the interpreter on CPU; timing it would "
                    "measure Python, not the kernel - run this on CUDA")
    if not CUDA and dtype == "bf16":
        pytest.skip("bf16 arithmetic on CPU is emulated and says nothing about the GPU; CPU runs fp32 only")
    fn, sets = _fn(variant), _input_sets(SHAPES[shape], DTYPES[dtype])
    state = {"i": 0}

    def steps():
        for _ in range(INNER):
            eps, eps_hat, g, t = sets[state["i"] % len(sets)]
            state["i"] += 1
            g.grad = None  # a fresh gradient each step, as an optimizer's zero_grad(set_to_none) gives
            fn(eps, eps_hat, g, t).backward()
        if CUDA:
            torch.cuda.synchronize()

    steps()  # warm-up: compilation and autotuning stay out of the timings
    benchmark(steps)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    per_step = stats.stats.median / INNER
    numel = math.prod(SHAPES[shape])
    # Minimum traffic of any fwd+bwd: read eps, eps_hat, g once, write dL/dg once.
    min_bytes = 4 * numel * torch.finfo(DTYPES[dtype]).bits // 8
    row = _MEDIANS.setdefault((shape, dtype), {})
    row[variant] = per_step
    benchmark.extra_info.update(device=DEVICE, inner_steps=INNER, per_step_us=per_step * 1e6,
                                min_traffic_GBps=min_bytes / per_step / 1e9)
    if CUDA:  # benchmarks/conftest.py's measured copy bandwidth: the roofline for this traffic
        benchmark.extra_info["frac_of_copy_bw"] = min_bytes / per_step / 1e9 / request.getfixturevalue("copy_bandwidth")
    for base in ("compile", "compile_loss_only"):
        if base in row and variant != base:
            benchmark.extra_info[f"speedup_vs_{base}"] = row[base] / per_step
