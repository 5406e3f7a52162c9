"""Does fusing DiTi's latent mask z ⊙ m_t into the latent projection pay? (CPU-runnable)

    python benchmarks/bench_latent_mask.py            # prints the comparison table
    pytest benchmarks/bench_latent_mask.py --benchmark-enable --benchmark-only

The latent projection is ``Linear(512, 4C)`` applied to z ⊙ m_t, once per step, at batch 64. A fused
masked GEMV could skip the mask multiply and the masked-off columns; the most it can save is the
difference between the masked projection and the bare ``F.linear`` (``mask_overhead``). That is
compared with the cost of ONE adaptive GroupNorm of one ResBlock (the eager composite), of which a
celeba64 UNet step runs dozens.

Variants of the projection:
* ``table``: the original, ``z * masks[idx]`` (a [k, 512] table gather) then ``F.linear``;
* ``arange``: ``F.linear(z * masks.prefix_mask(end_dims, D))``, mask from ``arange(D) < end_dims[:, None]``;
* ``nomask``: ``F.linear(z, W, b)``, the lower bound any fused kernel could reach.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diti_fast.kernels.fused_norm import adaptive_group_norm_ref
from diti_fast.masks import prefix_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, D, K, BASE_C = 64, 512, 64, 128
# Cheapest and dearest ResBlock norm of the celeba64 UNet (fp32 on CPU, as in the test suite).
NORMS = {"norm_C512_8x8": (512, 8), "norm_C128_64x64": (128, 64)}


def _projection_case(variant: str):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, D, generator=g).to(DEVICE)
    w = (torch.randn(4 * BASE_C, D, generator=g) / D ** 0.5).to(DEVICE)
    b = torch.zeros(4 * BASE_C, device=DEVICE)
    ends_table = torch.linspace(D / K, D, K).long().to(DEVICE)
    masks = (torch.arange(D, device=DEVICE)[None] < ends_table[:, None]).float()
    idx = torch.randint(0, K, (B,), generator=g).to(DEVICE)
    end_dims = ends_table[idx]
    if variant == "table":
        return lambda: F.linear(z * masks[idx], w, b)
    if variant == "arange":
        return lambda: F.linear(z * prefix_mask(end_dims, D), w, b)
    return lambda: F.linear(z, w, b)


def _norm_case(name: str):
    C, R = NORMS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, R, R, generator=g).to(DEVICE)
    wt, bs = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    s, sh = (0.1 * torch.randn(B, 2 * C, generator=g)).to(DEVICE).chunk(2, 1)
    sz, shz = (0.1 * torch.randn(B, 2 * C, generator=g)).to(DEVICE).chunk(2, 1)
    return lambda: adaptive_group_norm_ref(x, 32, wt, bs, s, sh, sz, shz, 1e-5, "silu")


CASES = {**{f"proj_{v}": (lambda v=v: _projection_case(v)) for v in ("table", "arange", "nomask")},
         **{n: (lambda n=n: _norm_case(n)) for n in NORMS}}


def _sync(fn):
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


@pytest.mark.parametrize("case", list(CASES))
def test_masked_latent_vs_norm(benchmark, case):
    with torch.no_grad():
        benchmark(_sync(CASES[case]()))
    benchmark.extra_info.update(device=DEVICE, batch=B, latent_dim=D, out_features=4 * BASE_C)


def main() -> None:
    from torch.utils import benchmark as tb

    torch.manual_seed(0)
    t, iqr = {}, {}
    with torch.no_grad():
        for name, make in CASES.items():
            fn = _sync(make())
            fn()
            m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0)
            t[name], iqr[name] = m.median, m.iqr
    print(f"device={DEVICE} threads={torch.get_num_threads()} batch={B} D={D} Linear({D}, {4 * BASE_C})")
    for name, sec in t.items():
        print(f"  {name:>18}: {sec * 1e6:10.1f} us  (IQR {iqr[name] * 1e6:.1f} us)")
    over = min(t["proj_table"], t["proj_arange"]) - t["proj_nomask"]
    # Negative or within the IQRs: the mask costs less than the timing noise of the projection.
    print(f"  mask overhead (best masked - bare linear): {over * 1e6:.1f} us")
    for n in NORMS:
        print(f"  whole projection / one {n}: {t['proj_arange'] / t[n]:.2e};"
              f"  mask overhead / one {n}: {max(over, 0.0) / t[n]:.2e}")


if __name__ == "__main__":
    main()
