"""Kernel-only timings of the fused adaptive GroupNorm and the fused loss, against copy bandwidth.

    python benchmarks/kernel_timing.py --json PATH [--tiny] [--presets celeba64,ffhq128]
                                       [--batches 128,16] [--dtypes bf16,fp32] [--budget-s 300]

On CUDA every row times one launch sequence (the Triton launches only, called through the op's
launchers, not through autograd) captured ``--inner`` times back to back in a CUDA graph and
replayed: the host's Python dispatch is not in the number (it is measured separately, see below).
The fallback, where capture fails, is CUDA events around ``--inner`` eager launches. Inputs
rotate over enough sets to exceed the L2, so each launch reads from HBM as a training step's
activations (written long before) mostly do.

Rows: the GroupNorm at every distinct (channels, resolution) of the preset's ShiftUNet (the
ResBlockShift case: weight, bias, scale, shift, z_scale, z_shift, SiLU; 32 groups), NCHW and
channels_last, and the DiTi loss at the preset's image shape [B, 3, R, R]; directions ``fwd``,
``bwd`` (GroupNorm: the backward launch alone, every gradient) and ``fwd+bwd``. ``bytes`` is the
minimum traffic, every tensor the launch sequence reads or writes counted once (a second walk over
a group served from L2 is not counted); ``gb_s = bytes / time`` and ``frac_of_copy`` is that over
the device-to-device copy bandwidth measured in the same process (read + write counted, as here).

channels_last rows whose launch plan differs from the one channels_last had before it got its own
(the NCHW plan) are timed with both: ``us_per_call_prev_plan``, ``speedup_vs_prev_plan``, and both
plans (groups per program, programs, bytes of each pixel row a program reads) in the row.
Rows run in order of interest (batch 128 before 16, celeba64 before ffhq128, bf16 before fp32);
past ``--budget-s`` no new row starts and the JSON says ``"truncated": true``.
``--plan-table`` only prints the channels_last plans at the presets' shapes (no GPU needed).

``host_overhead_us``: the host time per eager call of each op. ``dispatch_us``: the Triton launches
replaced by no-ops, so it is the Python around them (validation, planning, custom-op or
autograd.Function dispatch, allocations); ``before``/``after`` in one run compare the previous
dispatch path (the custom op in eager mode, the plan recomputed per call) with the current one.
On CUDA ``with_launch_us`` adds Triton's launcher: wall time per call of back-to-back eager calls at
a shape whose kernels are far shorter than the host work.

The JSON is rewritten after every row, so a killed run keeps what finished. ``--tiny`` without
CUDA is the CPU rehearsal of the GPU run: the same code on tiny shapes under TRITON_INTERPRET=1,
timed with perf_counter; its numbers mean nothing and the JSON says so (``"rehearsal": true``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from roofline import measure_copy_bandwidth  # benchmarks/, this script's folder

GROUPS = 32

# The UNet hyper-parameters of the presets (configs/<preset>.yaml, model.unet) and their image size;
# tests/test_kernel_timing.py checks this table against the YAML files.
PRESETS = {
    "celeba64": dict(res=64, base_channel=64, channel_multiplier=(1, 2, 4, 8), num_residual_blocks_of_a_block=2,
                     attention_resolutions=(4,)),
    "ffhq128": dict(res=128, base_channel=128, channel_multiplier=(1, 1, 2, 3, 4), num_residual_blocks_of_a_block=2,
                    attention_resolutions=(8,)),
    "shapes32": dict(res=32, base_channel=32, channel_multiplier=(1, 2, 2), num_residual_blocks_of_a_block=1,
                     attention_resolutions=(4,)),
}
TINY = {"tiny": [(8, 4), (16, 2)]}  # (C, R) with 4 groups: Cg = 2 and 4
TINY_GROUPS, TINY_BATCH, TINY_RES = 4, 2, 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
L2_ROTATE_BYTES = 256e6  # inputs rotate over at least this many bytes: well beyond an H100/H200 L2


def unet_norm_shapes(res: int, base_channel: int, channel_multiplier, num_residual_blocks_of_a_block: int,
                     attention_resolutions) -> list[tuple[int, int]]:
    """Distinct (channels, resolution) of every GroupNorm input of the ShiftUNet (diti_fast/nn/unet.py):
    encoder, middle, decoder (skip concatenations included), attention and output norms. The shift
    branch repeats the middle and decoder shapes."""
    sites = []
    ch = channel_multiplier[0] * base_channel
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_multiplier):
        for _ in range(num_residual_blocks_of_a_block):
            out = mult * base_channel
            sites += [(ch, res // ds), (out, res // ds)]            # ResBlock: in_layers, out_layers
            ch = out
            if ds in attention_resolutions:
                sites.append((ch, res // ds))
            chans.append(ch)
        if level != len(channel_multiplier) - 1:
            sites += [(ch, res // ds), (ch, res // (2 * ds))]       # down ResBlock: GN, resample, GN
            chans.append(ch)
            ds *= 2
    sites += [(ch, res // ds)] * 5                                  # middle: 2 ResBlocks + attention
    for level, mult in list(enumerate(channel_multiplier))[::-1]:
        for i in range(num_residual_blocks_of_a_block + 1):
            out = mult * base_channel
            sites += [(ch + chans.pop(), res // ds), (out, res // ds)]
            ch = out
            if ds in attention_resolutions:
                sites.append((ch, res // ds))
            if level and i == num_residual_blocks_of_a_block:
                sites += [(ch, res // ds), (ch, res // (ds // 2))]  # up ResBlock
                ds //= 2
    sites.append((ch, res))                                         # out / shift_out
    return sorted(set(sites), key=lambda s: (-s[1], s[0]))


def preset_norm_shapes(preset: str) -> list[tuple[int, int]]:
    return unet_norm_shapes(**PRESETS[preset])


# ---------------------------------------------------------------------------------------------
# traffic (minimum bytes of each launch sequence)
# ---------------------------------------------------------------------------------------------
def norm_bytes(B: int, C: int, HW: int, G: int, dtype: torch.dtype, direction: str) -> int:
    """Forward: x read, y written, weight/bias (fp32) and four [B, C] modulations (x's dtype) read,
    [B, G, 3] fp32 statistics written. Backward: dy, x read, dx written, statistics and the [C]/[B, C]
    parameters read, per-sample d weight / d bias partials (fp32 [B, C]) and four modulation
    gradients written."""
    e = torch.finfo(dtype).bits // 8
    n, bc, stats = B * C * HW * e, B * C * e, B * G * 3 * 4
    params = 2 * C * 4 + 4 * bc
    fwd = 2 * n + params + stats
    bwd = 3 * n + stats + params + 2 * B * C * 4 + 4 * bc
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def loss_bytes(B: int, M: int, dtype: torch.dtype, direction: str, num_buckets: int = 10) -> int:
    """What the op reads and writes. Forward without gradient: eps, eps_hat, g read; t (int64) read
    by both launches; two gathered fp32 table entries per sample; the loss, [B] per-sample losses and
    the bucket sums (fp32) and counts (int64) written. ``fwd+bwd``: dL/dg also written by the forward,
    then read and rewritten by the backward's rescale. The [B, blocks] fp32 partial sums passed
    between the two launches (B·M/512 bytes at most) are internal and not counted."""
    e = torch.finfo(dtype).bits // 8
    n = B * M * e
    fwd = 3 * n + 2 * B * 8 + 2 * B * 4 + 4 + B * 4 + num_buckets * (4 + 8)
    return fwd if direction == "fwd" else fwd + 3 * n


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Seconds per call of fn(i) (i indexes the rotating input sets): a CUDA graph of ``inner``
    calls replayed ``reps`` times (median), or CUDA events around eager calls, or perf_counter."""

    def __init__(self, cuda: bool, inner: int, reps: int):
        self.cuda, self.inner, self.reps = cuda, inner, reps

    def __call__(self, fn, n_sets: int) -> tuple[float, str]:
        fn(0)  # JIT compile and allocator warm-up, outside any timing
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                for i in range(self.inner):
                    fn(i % n_sets)
                times.append((time.perf_counter() - t0) / self.inner)
            return statistics.median(times), "perf_counter"
        torch.cuda.synchronize()
        try:
            return self._graph(fn, n_sets), "cuda_graph"
        except Exception as e:  # noqa: BLE001 - a capture failure falls back to events
            print(f"  cuda graph capture failed ({type(e).__name__}: {e}); timing with events", file=sys.stderr)
            torch.cuda.synchronize()
            return self._events(fn, n_sets), "cuda_events"

    def _graph(self, fn, n_sets):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(min(3, n_sets)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.inner):
                fn(i % n_sets)
        graph.replay()
        torch.cuda.synchronize()
        return self._median(graph.replay)

    def _events(self, fn, n_sets):
        def run():
            for i in range(self.inner):
                fn(i % n_sets)
        run()
        return self._median(run)

    def _median(self, run):
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / self.inner)
        return statistics.median(times)


def _n_sets(per_set_bytes: int, tiny: bool) -> int:
    return 2 if tiny else min(32, max(2, math.ceil(L2_ROTATE_BYTES / per_set_bytes)))


def norm_cases(agn, B, C, R, G, dtype, channels_last, device, tiny):
    """Input sets and the launch sequences of one GroupNorm row (ResBlockShift case, every gradient)."""
    shape = (B, C, R, R)
    e = torch.finfo(dtype).bits // 8
    n_sets = _n_sets(3 * B * C * R * R * e, tiny)
    gen = torch.Generator(device=device).manual_seed(0)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        dy = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        w = 1 + 0.1 * torch.randn(C, generator=gen, device=device)
        b = 0.1 * torch.randn(C, generator=gen, device=device)
        s, sh = (0.1 * torch.randn(B, 2 * C, generator=gen, device=device, dtype=dtype)).chunk(2, 1)
        sz, shz = (0.1 * torch.randn(B, 2 * C, generator=gen, device=device, dtype=dtype)).chunk(2, 1)
        mods = (w, b, s, sh, sz, shz)
        _, stats = agn._launch_fwd(x, G, *mods, 1e-5, True)
        sets.append((x, dy, mods, stats))

    def fwd(i):
        x, _, mods, _ = sets[i]
        agn._launch_fwd(x, G, *mods, 1e-5, True)

    def bwd(i):
        x, dy, mods, stats = sets[i]
        agn._launch_bwd(dy, x, stats, *mods, G, True, 127)

    def fwd_bwd(i):
        x, dy, mods, _ = sets[i]
        _, stats = agn._launch_fwd(x, G, *mods, 1e-5, True)
        agn._launch_bwd(dy, x, stats, *mods, G, True, 127)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, n_sets


def loss_cases(fl, B, R, dtype, channels_last, device, tiny, T=1000):
    shape = (B, 3, R, R)
    e = torch.finfo(dtype).bits // 8
    n_sets = _n_sets(3 * math.prod(shape) * e, tiny)
    gen = torch.Generator(device=device).manual_seed(0)
    coef = torch.rand(T, generator=gen, device=device)
    weight = torch.rand(T, generator=gen, device=device)
    sets = []
    for _ in range(n_sets):
        ts = [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3)]
        if channels_last:  # the op reads a channels_last batch through its NHWC permutation
            ts = [t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) for t in ts]
        t = torch.randint(0, T, (B,), generator=gen, device=device)
        sets.append((*ts, t))
    d_loss = torch.ones((), device=device)

    def fwd(i):
        eps, eps_hat, g, t = sets[i]
        fl._launch(eps, eps_hat, g, t, coef, weight, 10, T, False)

    def fwd_bwd(i):
        eps, eps_hat, g, t = sets[i]
        grad = fl._launch(eps, eps_hat, g, t, coef, weight, 10, T, True)[-1]
        grad * d_loss  # the op's backward: one rescale of the stored dL/dg

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}, n_sets


# ---------------------------------------------------------------------------------------------
# host overhead
# ---------------------------------------------------------------------------------------------
class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _per_call_us(fn, calls: int, reps: int, sync=None) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def norm_host_calls(agn, B, C, R, G, dtype, device):
    """(fwd, fwd_bwd) eager calls of the public op, the ResBlockShift case, all gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, R, R, generator=gen, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    emb = torch.zeros(B, 2 * C, device=device, dtype=dtype, requires_grad=True)
    emb_z = torch.zeros(B, 2 * C, device=device, dtype=dtype, requires_grad=True)
    dy = torch.ones_like(x)
    leaves = [x, w, b, emb, emb_z]

    def call():
        s, sh = emb.chunk(2, 1)
        sz, shz = emb_z.chunk(2, 1)
        return agn.adaptive_group_norm(x, G, w, b, s, sh, sz, shz, 1e-5, "silu")

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), leaves, dy)

    return fwd, fwd_bwd


def loss_host_calls(fl, B, R, dtype, device, T=1000):
    gen = torch.Generator(device=device).manual_seed(0)
    eps, eps_hat = (torch.randn(B, 3, R, R, generator=gen, device=device, dtype=dtype) for _ in range(2))
    g = torch.randn(B, 3, R, R, generator=gen, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, T, (B,), generator=gen, device=device)
    coef, weight = torch.rand(T, device=device), torch.rand(T, device=device)

    def fwd():
        with torch.no_grad():
            fl.diti_loss(eps, eps_hat, g, t, coef, weight, check_t=False)

    def fwd_bwd():
        torch.autograd.grad(fl.diti_loss(eps, eps_hat, g, t, coef, weight, check_t=False)[0], [g])

    return fwd, fwd_bwd


def host_overhead(agn, fl, device, *, B, C, R, G, dtype, calls=200, reps=5) -> dict:
    """Host µs per eager call with the Triton launches stubbed out: the previous dispatch path
    (``before``: custom op in eager mode, plans recomputed per call, loss launch config recomputed)
    against the current one (``after``), measured alternately in this one process."""
    nf, nfb = norm_host_calls(agn, B, C, R, G, dtype, device)
    lf, lfb = loss_host_calls(fl, B, R, dtype, device)
    out = {"norm_shape": [B, C, R, R], "loss_shape": [B, 3, R, R], "dtype": str(dtype).replace("torch.", ""),
           "calls": calls, "reps": reps, "note": "Triton launches replaced by no-ops: Python dispatch, "
           "validation, planning and allocations only; a shared machine: compare ratios, not absolute values"}
    stubs = dict(_agn_fwd_kernel=_NoLaunch(), _agn_bwd_kernel=_NoLaunch())
    lstubs = dict(_partial_kernel=_NoLaunch(), _finalize_kernel=_NoLaunch())
    before = dict(_EAGER_FUNCTION=False, _plan_cached=agn._plan_cached.__wrapped__)
    lbefore = dict(_launch_config=fl._launch_config.__wrapped__)
    with _patched(agn, **stubs), _patched(fl, **lstubs):
        for name, fn, mod, old in (("adaptive_group_norm.fwd", nf, agn, before),
                                   ("adaptive_group_norm.fwd+bwd", nfb, agn, before),
                                   ("diti_loss.fwd", lf, fl, lbefore),
                                   ("diti_loss.fwd+bwd", lfb, fl, lbefore)):
            b_us, a_us = [], []
            for _ in range(2):  # alternate, so drift in machine load hits both alike
                with _patched(mod, **old):
                    b_us.append(_per_call_us(fn, calls, reps))
                a_us.append(_per_call_us(fn, calls, reps))
            b, a = min(b_us), min(a_us)
            out[name] = {"before_us": round(b, 2), "after_us": round(a, 2), "ratio": round(b / a, 3)}
    return out


def host_with_launch(agn, fl, device, *, B, C, R, G, dtype, calls=200, reps=5) -> dict:
    """CUDA: wall µs per call of back-to-back eager calls (real launches, no sync inside the loop) at a
    shape whose kernels take far less than the host work, i.e. the host cost including Triton's launcher."""
    nf, nfb = norm_host_calls(agn, B, C, R, G, dtype, device)
    lf, lfb = loss_host_calls(fl, B, R, dtype, device)
    sync = torch.cuda.synchronize
    return {"norm_shape": [B, C, R, R], "loss_shape": [B, 3, R, R],
            "adaptive_group_norm.fwd": round(_per_call_us(nf, calls, reps, sync), 2),
            "adaptive_group_norm.fwd+bwd": round(_per_call_us(nfb, calls, reps, sync), 2),
            "diti_loss.fwd": round(_per_call_us(lf, calls, reps, sync), 2),
            "diti_loss.fwd+bwd": round(_per_call_us(lfb, calls, reps, sync), 2)}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _sig(v: float, digits: int = 6) -> float:
    """v to ``digits`` significant digits (readable JSON that keeps tiny rehearsal values nonzero)."""
    return float(f"{v:.{digits}g}")


def _plans(agn, B, G, Cg, HW, channels_last, dtype, sms):
    """{bwd: (current plan, the plan before channels_last had its own)} as small dicts."""
    out = {}
    e = torch.finfo(dtype).bits // 8
    for bwd in (False, True):
        pair = []
        for row_bytes in (agn._CL_ROW_BYTES, 0):
            with _patched(agn, _CL_ROW_BYTES=row_bytes):
                p = agn.launch_plan(B, G, Cg, HW, bwd=bwd, channels_last=channels_last, elem_size=e, sm_count=sms)
            pair.append({"gpb": p.gpb, "programs": B * p.ngb, "single": p.single, "block_s": p.block_s,
                         "num_warps": p.num_warps, "row_bytes": p.gpb * Cg * e if channels_last else None})
        out[bwd] = tuple(pair)
    return out


def _row(op, layout, shape, dtype, direction, seconds, nbytes, copy_gbs, timing, extra=None):
    gbs = nbytes / seconds / 1e9
    row = {"op": op, "layout": layout, "shape": list(shape), "dtype": dtype, "direction": direction,
           "us_per_call": _sig(seconds * 1e6), "bytes": int(nbytes), "gb_s": _sig(gbs),
           "frac_of_copy": _sig(gbs / copy_gbs), "timing": timing}
    row.update(extra or {})
    return row


def plan_table(agn, presets, batches, dtypes, sms: int) -> str:
    """The channels_last launch plans at the presets' GroupNorm shapes against the plan channels_last
    had before it got its own (what NCHW runs): groups per program, programs, bytes of each pixel
    row a program reads, register tile (R) or two walks (2W); forward / backward."""
    lines = [f"channels_last plans for {sms} SMs, 32 groups: fwd | bwd, each 'now (before)' as "
             "GPB/programs/row bytes/path (R: one read from registers, 2W: two walks)"]
    for preset in presets:
        for B in batches:
            for dt in dtypes:
                e = torch.finfo(DTYPES[dt]).bits // 8
                lines.append(f"{preset} batch {B} {dt}")
                for C, R in preset_norm_shapes(preset):
                    cells = []
                    for bwd in (False, True):
                        pair = []
                        for row_bytes in (agn._CL_ROW_BYTES, 0):
                            with _patched(agn, _CL_ROW_BYTES=row_bytes):
                                p = agn.launch_plan(B, GROUPS, C // GROUPS, R * R, bwd=bwd, channels_last=True,
                                                    elem_size=e, sm_count=sms)
                            pair.append(f"{p.gpb}/{B * p.ngb}/{p.gpb * (C // GROUPS) * e}B/{'R' if p.single else '2W'}")
                        cells.append(f"{pair[0]:>17} ({pair[1]:>17})")
                    lines.append(f"  C={C:<4d} {R:>3d}x{R:<3d} " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="output file (rewritten after every row); required unless --plan-table")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes; without CUDA: the interpreted CPU rehearsal")
    ap.add_argument("--presets", default="celeba64,ffhq128", help=f"comma list of {', '.join(PRESETS)}")
    ap.add_argument("--batches", default="128,16", help="per-GPU batch sizes (comma list)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    ap.add_argument("--inner", type=int, default=20, help="launch sequences per graph / timed batch")
    ap.add_argument("--reps", type=int, default=5, help="timed replays (median)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting rows after this many seconds (the JSON then says truncated)")
    ap.add_argument("--plan-table", action="store_true",
                    help="print the channels_last launch plans at the presets' shapes (no GPU needed) and exit")
    ap.add_argument("--sms", type=int, default=132, help="SM count for --plan-table (132: H100 SXM)")
    args = ap.parse_args(argv)

    if not args.plan_table and args.json is None:
        ap.error("--json PATH is required")
    if args.plan_table:
        os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
        import diti_fast.kernels.fused_norm as agn
        print(plan_table(agn, args.presets.split(","), [int(b) for b in args.batches.split(",")],
                         args.dtypes.split(","), args.sms))
        return 0

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            ap.error("without CUDA only --tiny runs (the interpreted rehearsal; its timings are meaningless)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    for name in args.presets.split(","):
        if name not in PRESETS:
            ap.error(f"--presets: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    batches = [int(b) for b in args.batches.split(",")]

    import diti_fast.kernels.fused_loss as fl
    import diti_fast.kernels.fused_norm as agn
    from diti_fast.kernels._common import INTERPRET

    device = "cuda" if cuda else "cpu"
    rehearsal = not cuda
    inner, reps = (1, 1) if rehearsal else (args.inner, args.reps)
    timer = Timer(cuda, inner, reps)
    t_start = time.perf_counter()
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
           "rehearsal": rehearsal, "tiny": args.tiny, "interpreted": INTERPRET,
           "torch": torch.__version__, "inner": inner, "reps": reps,
           "copy_gb_s": None, "rows": [], "host_overhead_us": {}, "truncated": False}
    if rehearsal:
        doc["note"] = ("CPU rehearsal: kernels interpreted, timed with perf_counter; every timing and "
                       "GB/s figure here is meaningless, only the structure is checked")
        # Launches planned as on a GPU (one SM, so that the tiny shapes still get several groups
        # per program in channels_last), not with the interpreter's own all-groups plan: the plans
        # the rows record are the ones that run.
        agn._INTERP_PLAN, agn._CPU_SM_COUNT = False, 1
        doc["sm_count"] = 1
    else:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        doc["sm_count"] = sms
        doc["method"] = (f"CUDA graph of {inner} back-to-back launch sequences (events as fallback), median of "
                         f"{reps} replays; inputs rotate over >= {L2_ROTATE_BYTES / 1e6:.0f} MB")
    doc["copy_gb_s"] = _sig(measure_copy_bandwidth((1 << 30) if cuda else (1 << 24), iters=10,
                                                   device="cuda" if cuda else "cpu"))
    _write(args.json, doc)
    copy_gbs = doc["copy_gb_s"]

    if args.tiny:
        plan = [("tiny", TINY_BATCH, TINY["tiny"], TINY_GROUPS, TINY_RES)]
    else:
        plan = [(p, b, preset_norm_shapes(p), GROUPS, PRESETS[p]["res"])
                for b in batches for p in args.presets.split(",")]

    # Host overhead first: cheap, and independent of the kernels' compile state.
    hb, hc, hr = (TINY_BATCH, 16, TINY_RES) if args.tiny else (16, 128, 8)
    hg = TINY_GROUPS if args.tiny else GROUPS
    hdt = DTYPES[dtypes[0]]
    doc["host_overhead_us"]["dispatch"] = host_overhead(agn, fl, device, B=hb, C=hc, R=hr, G=hg, dtype=hdt,
                                                        calls=20 if rehearsal else 300, reps=3 if rehearsal else 5)
    if cuda:
        doc["host_overhead_us"]["with_launch_us"] = host_with_launch(agn, fl, device, B=hb, C=hc, R=hr, G=hg,
                                                                     dtype=hdt)
    _write(args.json, doc)

    def over_budget():
        if time.perf_counter() - t_start > args.budget_s:
            doc["truncated"] = True
            return True
        return False

    sms = doc.get("sm_count", agn._CPU_SM_COUNT)
    for preset, B, shapes, G, res in plan:
        for dt in dtypes:
            dtype = DTYPES[dt]
            for C, R in shapes:
                for layout in ("nchw", "nhwc"):
                    if over_budget():
                        break
                    fns, n_sets = norm_cases(agn, B, C, R, G, dtype, layout == "nhwc", device, args.tiny)
                    plans = _plans(agn, B, G, C // G, R * R, layout == "nhwc", dtype, sms)
                    for direction, fn in fns.items():
                        sec, how = timer(fn, n_sets)
                        nbytes = norm_bytes(B, C, R * R, G, dtype, direction)
                        extra = {"preset": preset, "groups": G, "input_sets": n_sets,
                                 "plan": {k: plans[k != "fwd"][0] for k in ("fwd", "bwd")}}
                        if layout == "nhwc" and any(cur != prev for cur, prev in plans.values()):
                            # The plan channels_last had before it got its own (groups per program
                            # sized for contiguous row bytes): same row, timed again with that plan.
                            extra["prev_plan"] = {k: plans[k != "fwd"][1] for k in ("fwd", "bwd")}
                            with _patched(agn, _CL_ROW_BYTES=0):
                                prev, _ = timer(fn, n_sets)
                            extra["us_per_call_prev_plan"] = _sig(prev * 1e6)
                            extra["frac_of_copy_prev_plan"] = _sig(nbytes / prev / 1e9 / copy_gbs)
                            extra["speedup_vs_prev_plan"] = _sig(prev / sec, 4)
                        doc["rows"].append(_row("adaptive_group_norm", layout, (B, C, R, R), dt, direction, sec,
                                                nbytes, copy_gbs, how, extra))
                        _write(args.json, doc)
                    del fns
            for layout in ("nchw", "nhwc"):
                if over_budget():
                    break
                fns, n_sets = loss_cases(fl, B, res, dtype, layout == "nhwc", device, args.tiny)
                for direction, fn in fns.items():
                    sec, how = timer(fn, n_sets)
                    doc["rows"].append(_row("diti_loss", layout, (B, 3, res, res), dt, direction, sec,
                                            loss_bytes(B, 3 * res * res, dtype, direction), copy_gbs, how,
                                            {"preset": preset, "input_sets": n_sets}))
                    _write(args.json, doc)
                del fns
            if cuda:
                torch.cuda.empty_cache()
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    _write(args.json, doc)
    print(f"kernel_timing: {len(doc['rows'])} rows -> {args.json}"
          + (" (truncated by --budget-s)" if doc["truncated"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
