"""Attention backends at the UNet's attention levels, forward+backward (pytest-benchmark).

    pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-only -s

Two scopes per preset level: ``attn`` (qkv_attention alone, gradient to qkv) and ``block`` (an
AttentionBlock: GroupNorm -> qkv 1x1 conv -> attention -> proj 1x1 conv -> residual, gradients to
the input and the weights). ``extra_info`` records each backend's speed-up over ``math`` (goal on
an H200: sdpa >= 3x math at the 16x16 level) and over ``math_compiled``, the same math formulation
under torch.compile (Inductor fuses the scaling, softmax and casts around the two matmuls): the
fair baseline for what a fused attention kernel adds beyond what the compiler already gets from
the plain formulation. ``-s`` prints a summary table.

On CUDA the tensors are bf16 (the dtype the fused kernels serve) and fp32; on CPU fp32 only, with
the batch divided by CPU_BATCH_DIV so a run stays short: CPU numbers are ratios, nothing more.
"""
from __future__ import annotations

import pytest
import torch

from diti_fast.nn.attention import backend_unavailable_reason, qkv_attention
from diti_fast.nn.blocks import AttentionBlock

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_BATCH_DIV = 8
INNER = 10 if CUDA else 1

# (batch, channels, side, heads) of the attention levels of the presets. Mirrors the celeba64 and
# ffhq128 presets in configs/ (base_channel x channel_multiplier at each attention resolution):
# keep this table in sync with them when they change.
LEVELS = {
    "celeba64-16x16": (64, 256, 16, 1),
    "celeba64-8x8": (64, 512, 8, 1),
    "ffhq128-16x16": (32, 512, 16, 1),
}
# math first, then its compiled form: the others' ratios need their times.
BACKENDS = ["math", "math_compiled", "sdpa", "xformers"]
BASELINES = ("math", "math_compiled")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_MEDIANS: dict[tuple[str, str, str], dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _MEDIANS:
        return
    print(f"\nAttention fwd+bwd per step (ms) and speed-up over math / compiled math [{DEVICE}]:")
    for (level, scope, dtype), row in _MEDIANS.items():
        cells = [f"{b}={row[b] * 1e3:.2f}" + "".join(f" ({row[m] / row[b]:.2f}x {m})" for m in BASELINES
                                                       if m in row and m != b)
                 for b in BACKENDS if b in row]
        print(f"  {level:>15} {scope:>5} {dtype:>4}: " + ", ".join(cells))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scope", ["attn", "block"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_attention_fwd_bwd(benchmark, level, scope, dtype, new_order, backend):
    compiled = backend == "math_compiled"
    kernel = "math" if compiled else backend
    reason = backend_unavailable_reason(kernel, DEVICE)
    if reason:
        pytest.skip(reason)
    if not CUDA and dtype == "bf16":
        pytest.skip("bf16 matmuls on CPU say nothing about the GPU kernels; CPU runs fp32 only")
    if not CUDA and new_order:
        pytest.skip("both layouts cost one identical copy; the CPU run times the legacy one only")
    batch, channels, side, heads = LEVELS[level]
    if not CUDA:
        batch = max(1, batch // CPU_BATCH_DIV)
    torch.manual_seed(0)
    block = AttentionBlock(channels, num_heads=heads, new_order=new_order).to(DEVICE, DTYPES[dtype])
    torch.nn.init.normal_(block.proj_out.weight, std=0.02)  # zero-init would cut the attention's gradient
    block.attention = kernel
    x = torch.randn(batch, channels, side, side, device=DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    qkv = torch.randn(batch, 3 * channels, side * side, device=DEVICE, dtype=DTYPES[dtype], requires_grad=True)

    def attn(q):
        return qkv_attention(q, block.num_heads, new_order, kernel)

    run_block, run_attn = block, attn
    if compiled:
        torch._dynamo.reset()
        run_block, run_attn = torch.compile(block, fullgraph=True), torch.compile(attn, fullgraph=True)

    def steps():
        for _ in range(INNER):
            out = run_block(x) if scope == "block" else run_attn(qkv)
            out.float().square().mean().backward()
        if CUDA:
            torch.cuda.synchronize()

    steps()  # warm-up (cuDNN / kernel selection; compilation for math_compiled)
    benchmark(steps)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    per_step = stats.stats.median / INNER
    row = _MEDIANS.setdefault((level, scope, dtype), {})
    row[backend] = per_step
    benchmark.extra_info.update(device=DEVICE, batch=batch, channels=channels, tokens=side * side,
                                heads=heads, per_step_ms=per_step * 1e3)
    for base in BASELINES:
        if base in row and backend != base:
            benchmark.extra_info[f"speedup_vs_{base}"] = row[base] / per_step
