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
Each timed call runs ``INNER`` steps and synchronises once; inputs rotate over enough sets to
exceed the L2 so small shapes are not measured out of cache.
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

pytestmark = pytest.mark.skipif(
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
VARIANTS = ["eager", "compile", "triton"]
MODES = ["fwd", "fwd_bwd"]

# One specialised graph per (shape, dtype, grad mode), as a fixed training run would have; the
# default recompile limit (8) would silently fall back to eager after the eighth case.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
_compiled_ref = torch.compile(adaptive_group_norm_ref, dynamic=False)
_FNS = {"eager": adaptive_group_norm_ref, "compile": _compiled_ref, "triton": adaptive_group_norm_triton}
_ROWS: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}


def _input_sets(C, R, dtype, train):
    shape = (BATCH, C, R, R)
    per_set = 2 * math.prod(shape) * torch.finfo(dtype).bits // 8  # x and dy
    n = min(32, max(2, math.ceil(256e6 / per_set)))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=dtype)  # noqa: E731
    sets = []
    for _ in range(n):
        x, dy = r(*shape), r(*shape)
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
    for (shape, dtype, mode), row in _ROWS.items():
        cells = [f"{v}={row[v][0] * 1e6:.0f}us {row[v][1]:.0f}GB/s ({row[v][2]:.0%})" for v in VARIANTS if v in row]
        tail = ""
        if "triton" in row:
            t = row["triton"][0]
            tail = "  " + " ".join(f"x{row[v][0] / t:.2f} vs {v}" for v in ("eager", "compile") if v in row)
        print(f"  {shape:>13} {dtype:>4} {mode:>7}: " + ", ".join(cells) + tail)


@pytest.mark.parametrize("variant", VARIANTS)  # outermost: both baselines are timed before triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_adaptive_group_norm(benchmark, copy_bandwidth, variant, mode, dtype, shape):
    C, R = SHAPES[shape]
    train = mode == "fwd_bwd"
    fn, sets = _FNS[variant], _input_sets(C, R, DTYPES[dtype], train)
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
    row = _ROWS.setdefault((shape, dtype, mode), {})
    row[variant] = (per_call, gbps, gbps / copy_bandwidth)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), batch=BATCH, channels=C, hw=R * R,
                                groups=GROUPS, inner_steps=INNER, per_call_us=per_call * 1e6,
                                min_traffic_bytes=min_bytes, min_traffic_GBps=gbps,
                                copy_GBps=copy_bandwidth, fraction_of_copy=gbps / copy_bandwidth)
    if variant == "triton":
        for base in ("eager", "compile"):
            if base in row:
                benchmark.extra_info[f"speedup_vs_{base}"] = row[base][0] / per_call
