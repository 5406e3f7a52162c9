"""Adaptive GroupNorm + SiLU: eager composite vs torch.compile(composite) vs the fused Triton op.

    pytest benchmarks/bench_fused_norm.py --benchmark-enable --benchmark-only -s \
        --benchmark-json=benchmarks/results/adaptive_group_norm-<device>-<date>.json

CUDA only: on CPU the Triton kernel runs under the interpreter, whose timings measure Python, so
every case skips with that reason.

Case: the ResBlockShift norm (weight, bias, scale, shift, z_scale, z_shift, SiLU; the modulations
are ``torch.chunk`` views as the UNet produces them) at the celeba64 training shapes, batch 64,
32 groups. Two modes:

* ``fwd``: under ``torch.no_grad`` (the frozen DDPM trunk's use);
* ``fwd_bwd``: forward, then ``torch.autograd.grad`` for x, weight, bias and both [B, 2C]
  modulation tensors (the trainable decoder's use).

Bandwidth is reported over the minimum traffic of any implementation: forward reads x and writes
y (2·N elements), forward+backward additionally reads x and dy and writes dx (5·N in all); the
[B, C] tensors are noise. ``extra_info`` holds per-call time, those GB/s, their fraction of the
measured device-to-device copy bandwidth (``copy_bandwidth`` fixture), and the Triton op's speed-up
over ``eager`` and ``compile``. Goal on an H200: fwd_bwd >= 80 % of copy bandwidth at 32² and 64²,
>= 3x eager and >= 1.3x compile. ``-s`` prints the summary table.

Shapes: by default the UNet's level shapes (C, H·W) = (128, 64²), (256, 32²), (384, 16²), (512, 8²);
``AGN_BENCH_SHAPES=all`` runs the full {128, 256, 384, 512} × {64², 32², 16², 8²} grid.
Dtypes: ``AGN_BENCH_DTYPES`` (default ``bf16``; e.g. ``bf16,fp32``).
Layouts: ``nchw`` and ``nhwc`` (channels_last, what the engine runs on CUDA; its launch plan puts
several groups in a program so each reads whole sectors of a pixel row); ``AGN_BENCH_LAYOUTS``
(default both).
Each timed call runs ``INNER`` steps and synchronises once; inputs rotate over enough sets to
exceed the L2 so small shapes are not measured out of cache. These timings include the host's
dispatch (for the kernels alone: ``benchmarks/kernel_timing.py``, CUDA graphs).

``test_host_overhead`` runs everywhere (CPU too): the host time per eager call of the fused ops with
the Triton launches replaced by no-ops, i.e. the Python dispatch, validation, planning and
allocations, at the celeba64 ResBlockShift shape (batch 16, 128 channels, 64², bf16) for the norm
and the image shape for the loss. ``path=before`` is the previous dispatch (the custom op in eager
mode, plans recomputed per call), ``after`` the current one; ``extra_info`` of the ``after`` case
holds the ratio. On a shared machine compare the ratio, not the absolute times.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernel module must see this before import (nothing here runs on CPU anyway)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diti_fast.kernels.fused_norm import (  # noqa: E402
    adaptive_group_norm_ref,
    adaptive_group_norm_triton,
)

needs_cuda = pytest.mark.skipif(
    not CUDA, reason="GPU benchmark: the Triton kernel only runs interpreted on CPU, where timings "
                     "measure Python, not the kernel - run this on CUDA")

DEVICE = "cuda" if CUDA else "cpu"
BATCH, GROUPS = 64, 32
LEVELS = [(128, 64), (256, 32), (384, 16), (512, 8)]
GRID = [(c, r) for c in (128, 256, 384, 512) for r in (64, 32, 16, 8)]
SHAPES = {f"C{c}_{r}x{r}": (c, r) for c, r in (GRID if os.environ.get("AGN_BENCH_SHAPES") == "all" else LEVELS)}
_DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPES = {k: _DT[k] for k in os.environ.get("AGN_BENCH_DTYPES", "bf16").split(",")}
INNER = 20
LAYOUTS = os.environ.get("AGN_BENCH_LAYOUTS", "nchw,nhwc").split(",")
VARIANTS = ["eager", "compile", "triton"]
MODES = ["fwd", "fwd_bwd"]

# One specialised graph per (shape, dtype, grad mode), as a fixed training run would have; the
# default recompile limit (8) would silently fall back to eager after the eighth case.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
_compiled_ref = torch.compile(adaptive_group_norm_ref, dynamic=False)
_FNS = {"eager": adaptive_group_norm_ref, "compile": _compiled_ref, "triton": adaptive_group_norm_triton}
_ROWS: dict[tuple[str, str, str, str], dict[str, tuple[float, float]]] = {}


def _input_sets(C, R, dtype, train, layout="nchw"):
    shape = (BATCH, C, R, R)
    per_set = 2 * math.prod(shape) * torch.finfo(dtype).bits // 8  # x and dy
    n = min(32, max(2, math.ceil(256e6 / per_set)))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=dtype)  # noqa: E731
    sets = []
    for _ in range(n):
        x, dy = r(*shape), r(*shape)
        if layout == "nhwc":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        w, b = 1 + 0.1 * r(C), 0.1 * r(C)
        emb, emb_z = 0.1 * r(BATCH, 2 * C), 0.1 * r(BATCH, 2 * C)
        leaves = [x, w, b, emb, emb_z]
        if train:
            for t in leaves:
                t.requires_grad_(True)
        sets.append((leaves, dy))
    return sets


def _step(fn, leaves, dy, train):
    x, w, b, emb, emb_z = leaves
    scale, shift = emb.chunk(2, dim=1)
    z_scale, z_shift = emb_z.chunk(2, dim=1)
    y = fn(x, GROUPS, w, b, scale, shift, z_scale, z_shift, 1e-5, "silu")
    if train:
        torch.autograd.grad(y, leaves, dy)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _ROWS:
        return
    print("\nadaptive GroupNorm+SiLU (ResBlockShift case), batch 64: us per call, GB/s over minimum "
          "traffic (fraction of copy bandwidth); triton speed-up over eager / compile")
    for (shape, layout, dtype, mode), row in _ROWS.items():
        cells = [f"{v}={row[v][0] * 1e6:.0f}us {row[v][1]:.0f}GB/s ({row[v][2]:.0%})" for v in VARIANTS if v in row]
        tail = ""
        if "triton" in row:
            t = row["triton"][0]
            tail = "  " + " ".join(f"x{row[v][0] / t:.2f} vs {v}" for v in ("eager", "compile") if v in row)
        print(f"  {shape:>13} {layout:>4} {dtype:>4} {mode:>7}: " + ", ".join(cells) + tail)


@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)  # outermost: both baselines are timed before triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_adaptive_group_norm(benchmark, copy_bandwidth, variant, mode, dtype, layout, shape):
    C, R = SHAPES[shape]
    train = mode == "fwd_bwd"
    fn, sets = _FNS[variant], _input_sets(C, R, DTYPES[dtype], train, layout)
    state = {"i": 0}

    def steps():
        with torch.set_grad_enabled(train):
            for _ in range(INNER):
                leaves, dy = sets[state["i"] % len(sets)]
                state["i"] += 1
                _step(fn, leaves, dy, train)
        torch.cuda.synchronize()

    steps()  # warm-up: compilation and Triton JIT stay out of the timings
    benchmark(steps)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    per_call = stats.stats.median / INNER
    numel = BATCH * C * R * R
    min_bytes = (5 if train else 2) * numel * torch.finfo(DTYPES[dtype]).bits // 8
    gbps = min_bytes / per_call / 1e9
    row = _ROWS.setdefault((shape, layout, dtype, mode), {})
    row[variant] = (per_call, gbps, gbps / copy_bandwidth)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), batch=BATCH, channels=C, hw=R * R, layout=layout,
                                groups=GROUPS, inner_steps=INNER, per_call_us=per_call * 1e6,
                                min_traffic_bytes=min_bytes, min_traffic_GBps=gbps,
                                copy_GBps=copy_bandwidth, fraction_of_copy=gbps / copy_bandwidth)
    if variant == "triton":
        for base in ("eager", "compile"):
            if base in row:
                benchmark.extra_info[f"speedup_vs_{base}"] = row[base][0] / per_call


# ----------------------------------------------------------------------------------------------
# host overhead per eager call (CPU or CUDA): Triton launches stubbed out
# ----------------------------------------------------------------------------------------------
_HOST: dict[tuple[str, str, str], float] = {}
HOST_NORM = dict(B=16, C=128, R=64, G=GROUPS)  # celeba64's first-level ResBlockShift norm, per-GPU batch 16
# The loss's backward is one elementwise rescale of dL/dg: asynchronous on CUDA, but computed on the
# spot on a CPU tensor, where at 64² it would outweigh the Python being measured. Its dispatch
# does not depend on the size, so the CPU case uses an 8² image.
HOST_LOSS = dict(B=16, R=64 if CUDA else 8)


@pytest.mark.parametrize("path", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["adaptive_group_norm", "diti_loss"])
def test_host_overhead(benchmark, op, mode, path):
    import diti_fast.kernels.fused_loss as fl
    import diti_fast.kernels.fused_norm as agn
    from kernel_timing import _NoLaunch, _patched, loss_host_calls, norm_host_calls

    if op == "adaptive_group_norm":
        fns = norm_host_calls(agn, **HOST_NORM, dtype=torch.bfloat16, device=DEVICE)
        module, before = agn, dict(_EAGER_FUNCTION=False, _plan_cached=agn._plan_cached.__wrapped__)
        stubs = dict(_agn_fwd_kernel=_NoLaunch(), _agn_bwd_kernel=_NoLaunch())
    else:
        fns = loss_host_calls(fl, **HOST_LOSS, dtype=torch.bfloat16, device=DEVICE)
        module, before = fl, dict(_launch_config=fl._launch_config.__wrapped__)
        stubs = dict(_partial_kernel=_NoLaunch(), _finalize_kernel=_NoLaunch())
    fn = fns[MODES.index(mode)]
    # The GPU launch plan even on a CPU tensor (the interpreter's own plan is a different code path).
    with _patched(module, **stubs, **(before if path == "before" else {})), \
            _patched(agn, _INTERP_PLAN=False):
        fn()
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    _HOST[(op, mode, path)] = stats.stats.min  # the least disturbed call: a shared machine
    benchmark.extra_info.update(op=op, mode=mode, path=path, per_call_us=stats.stats.median * 1e6,
                                device=DEVICE, launches="stubbed")
    if path == "after" and (op, mode, "before") in _HOST:
        benchmark.extra_info["before_over_after_min"] = _HOST[(op, mode, "before")] / stats.stats.min
