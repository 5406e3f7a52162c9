"""Fused adaptive GroupNorm (+SiLU) against PyTorch's own ops in fp64, autograd's gradcheck, and
the bf16 error of PyTorch itself. On CPU the Triton kernels run under TRITON_INTERPRET=1, so every
shape here is tiny; on a CUDA machine the same tests run the compiled kernels."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the kernel module's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diti_fast.kernels.fused_norm as agn  # noqa: E402
from diti_fast.kernels._common import use_triton  # noqa: E402
from diti_fast.kernels.fused_norm import adaptive_group_norm, adaptive_group_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set before import)")

MODS = ("scale", "shift", "z_scale", "z_shift")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_case(B, C, spatial, mods=MODS, affine=True, seed=0, offset=0.0, spread=1.5):
    """fp64 CPU leaves. scale/shift (and z_scale/z_shift) are torch.chunk views of one [B, 2C]
    leaf, exactly as the UNet produces them from emb_out, so they are strided."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = {"x": offset + spread * r(B, C, *spatial)}
    if affine:
        leaves["weight"] = 1.0 + 0.5 * r(C)
        leaves["bias"] = 0.5 * r(C)
    if "scale" in mods or "shift" in mods:
        leaves["emb"] = 0.5 * r(B, 2 * C)
    if "z_scale" in mods or "z_shift" in mods:
        leaves["emb_z"] = 0.5 * r(B, 2 * C)
    return leaves


def call(fn, leaves, G, mods=MODS, act="silu", **kw):
    """Build the op's arguments from the leaves (chunk views for the modulations) and call fn."""
    args = {"weight": leaves.get("weight"), "bias": leaves.get("bias")}
    if "emb" in leaves:
        s, b = leaves["emb"].chunk(2, dim=1)
        args["scale"], args["shift"] = (s if "scale" in mods else None), (b if "shift" in mods else None)
    if "emb_z" in leaves:
        s, b = leaves["emb_z"].chunk(2, dim=1)
        args["z_scale"], args["z_shift"] = (s if "z_scale" in mods else None), (b if "z_shift" in mods else None)
    return fn(leaves["x"], G, **args, eps=1e-5, act=act, **kw)


def cast(leaves, dtype, device=DEVICE, memory_format=None, grad=True):
    out = {}
    for k, v in leaves.items():
        t = v.to(device=device, dtype=dtype)
        if k == "x" and memory_format is not None:
            t = t.contiguous(memory_format=memory_format)
        out[k] = t.detach().requires_grad_(grad)
    return out


def fwd_bwd(fn, leaves, G, dy_seed=1, dy_dtype=None, **kw):
    """Output and the gradients of every leaf (ordered by key) for a fixed random upstream dy
    (first rounded to ``dy_dtype`` when given, so that runs in different dtypes see the same dy)."""
    y = call(fn, leaves, G, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64)
    if dy_dtype is not None:
        dy = dy.to(dy_dtype)
    dy = dy.to(device=y.device, dtype=y.dtype)
    keys = sorted(leaves)
    grads = torch.autograd.grad(y, [leaves[k] for k in keys], dy, allow_unused=True)
    return y, dict(zip(keys, grads))


def triton(x, G, **kw):
    return adaptive_group_norm(x, G, **kw, backend="triton")


def assert_close64(got, ref, rtol=2e-5, atol_rel=2e-5, what=""):
    """|got − ref| ≤ rtol·|ref| + atol_rel·max(max|ref|, 1) (fp32 kernel against the fp64 composite;
    the floor of 1 keeps a tensor that is exactly zero in theory, e.g. d weight when every group has
    one element, from being held to the reference's own 1e-15 round-off)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, what
    tol = rtol * ref.abs() + atol_rel * ref.abs().max().clamp_min(1.0)
    err = (got - ref).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max().item():.3e}, max |ref| {ref.abs().max().item():.3e}"


@pytest.fixture
def looped(monkeypatch):
    """Shrink the tile knobs so tiny shapes take the multi-tile path (channel and spatial loops,
    partial tiles) that the real shapes use, with 2 groups per program (one of them masked when G
    is odd)."""
    monkeypatch.setattr(agn, "_INTERP_PLAN", False)
    monkeypatch.setattr(agn, "_GPB", 2)
    monkeypatch.setattr(agn, "_SINGLE_MAX_FWD", 0)
    monkeypatch.setattr(agn, "_SINGLE_MAX_BWD", 0)
    monkeypatch.setattr(agn, "_TILE", 32)
    monkeypatch.setattr(agn, "_MAX_BLOCK_C", 2)


@pytest.fixture
def gpu_plan(monkeypatch):
    """Plan launches as on a GPU (one group per program at these tiny sizes) instead of the
    interpreter's all-groups-in-one-program plan."""
    monkeypatch.setattr(agn, "_INTERP_PLAN", False)


def check_fp32_against_fp64(B, C, spatial, G, mods=MODS, act="silu", affine=True, memory_format=None, **case):
    leaves = make_case(B, C, spatial, mods, affine, **case)
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, cast(leaves, torch.float64, "cpu"), G, mods=mods, act=act)
    inp = cast(leaves, torch.float32, memory_format=memory_format)
    y, g = fwd_bwd(triton, inp, G, mods=mods, act=act)
    assert y.dtype == torch.float32
    assert_close64(y, ref_y, what="y")
    for k in ref_g:
        assert_close64(g[k], ref_g[k], rtol=1e-4, atol_rel=1e-4, what=f"d{k}")
    return y, g


# ----------------------------------------------------------------------------------------------
# forward + every gradient, fp32 against the fp64 composite
# ----------------------------------------------------------------------------------------------
MOD_COMBOS = [tuple(m for m, on in zip(MODS, bits) if on) for bits in itertools.product((0, 1), repeat=4)]


@pytest.mark.parametrize("mods", MOD_COMBOS, ids=lambda m: "+".join(m) or "plain")
def test_every_modulation_combination(mods):
    # C = 12, G = 4: Cg = 3 is not a power of two (masked channel rows); H·W = 35 is odd.
    check_fp32_against_fp64(2, 12, (5, 7), 4, mods=mods)


@pytest.mark.parametrize("mods", [(), ("scale", "shift"), MODS], ids=["plain", "resblock", "shift"])
def test_no_activation(mods):
    check_fp32_against_fp64(2, 8, (3, 5), 2, mods=mods, act=None)


@pytest.mark.parametrize("B,C,spatial,G", [
    (1, 6, (3, 13), 3),        # B = 1, H·W = 39
    (2, 20, (37,), 4),         # 3-D input (attention block's [B, C, L]), Cg = 5
    (1, 8, (2, 3, 5), 2),      # 5-D input: every trailing dim is spatial
    (2, 4, (1, 1), 4),         # one element per group (var = 0, rstd = 1/sqrt(eps))
])
def test_odd_shapes(B, C, spatial, G):
    check_fp32_against_fp64(B, C, spatial, G)


@pytest.mark.parametrize("mods", [(), MODS], ids=["plain", "all"])
def test_multi_tile_path(looped, mods):
    # G = 3 in blocks of 2 groups (last block half masked); Cg = 5 in chunks of 2 (last partial);
    # H·W = 33 in tiles of 8 (last partial).
    check_fp32_against_fp64(2, 15, (3, 11), 3, mods=mods)


@pytest.mark.parametrize("mods", [(), MODS], ids=["plain", "all"])
def test_gpu_launch_plan(gpu_plan, mods):
    check_fp32_against_fp64(2, 12, (5, 7), 4, mods=mods)


def test_no_affine():
    check_fp32_against_fp64(2, 8, (4, 5), 4, affine=False)


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["single", "looped"])
def test_channels_last(request, path):
    if path == "looped":
        request.getfixturevalue("looped")
    y, g = check_fp32_against_fp64(2, 12, (5, 6), 4, memory_format=torch.channels_last)
    # no hidden NCHW round trip: output and dx keep the input's layout
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert g["x"].is_contiguous(memory_format=torch.channels_last)


def test_non_collapsible_layout_falls_back_to_a_copy():
    # A transposed view whose spatial dims cannot be walked with one stride.
    leaves = make_case(2, 8, (4, 6), seed=3)
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, cast(leaves, torch.float64, "cpu"), 2)
    inp = cast(leaves, torch.float32)
    base = inp["x"].detach().transpose(2, 3).contiguous().requires_grad_()
    inp["x"] = base
    x_view = base.transpose(2, 3)
    assert agn._bcs_strides(x_view) is None
    s, b = inp["emb"].chunk(2, 1)
    sz, bz = inp["emb_z"].chunk(2, 1)
    y = triton(x_view, 2, weight=inp["weight"], bias=inp["bias"], scale=s, shift=b, z_scale=sz, z_shift=bz)
    assert_close64(y, ref_y, what="y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    (dx,) = torch.autograd.grad(y, [base], dy)
    assert_close64(dx.transpose(2, 3), ref_g["x"], rtol=1e-4, atol_rel=1e-4, what="dx")


def test_modulation_as_b_c_1_1_views():
    # The original code chunks emb_out[..., None, None]: [B, C, 1, 1] strided views are accepted.
    leaves = cast(make_case(2, 8, (3, 4), seed=5), torch.float32)
    s, b = leaves["emb"][..., None, None].chunk(2, dim=1)
    sz, bz = leaves["emb_z"][..., None, None].chunk(2, dim=1)
    kw = dict(weight=leaves["weight"], bias=leaves["bias"], scale=s, shift=b, z_scale=sz, z_shift=bz)
    y = triton(leaves["x"], 4, **kw)
    ref = adaptive_group_norm_ref(leaves["x"].double(), 4, **{k: v.double() for k, v in kw.items()})
    assert_close64(y, ref, what="y")


# ----------------------------------------------------------------------------------------------
# reduced precision: bf16 no worse than twice PyTorch's own bf16 error (plus bf16's rounding); fp16
# within half an ulp of fp16 of every element (fp32 arithmetic, one rounding of the output)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["nchw", "cl"])
def test_half_precision_bound(dtype, memory_format):
    leaves = make_case(2, 16, (5, 6), seed=7)
    low = cast(leaves, dtype, "cpu", grad=False)               # the values actually representable
    # The same upstream gradient everywhere: dy rounded to the half dtype, exact in fp32.
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, cast(low, torch.float32, "cpu"), 4, dy_dtype=dtype)
    pt_y, pt_g = fwd_bwd(adaptive_group_norm_ref, cast(low, dtype, DEVICE, memory_format), 4, dy_dtype=dtype)
    y, g = fwd_bwd(triton, cast(low, dtype, DEVICE, memory_format), 4, dy_dtype=dtype)
    assert y.dtype == dtype and g["x"].dtype == dtype

    def bound(got, pt, ref, what):
        got, pt, ref = (t.detach().float().cpu() for t in (got, pt, ref))
        top = ref.abs().max().item()
        if dtype == torch.float16:
            # The kernel computes in fp32 on the same rounded inputs and rounds once to fp16: every
            # element within half an ulp of fp16 (2^-11 of its value; 2^-25 absolute below fp16's
            # normal range), plus fp32 round-off relative to the tensor's scale. PyTorch's own fp16
            # composite rounds in between (~1e-3 of max|ref| here), which would hide a kernel that
            # rounds through bf16 (2^-9): no comparison with it.
            tol = 2.0 ** -11 * ref.abs() + 2.0 ** -25 + 1e-5 * top
            worst = ((got - ref).abs() / tol).max().item()
            assert worst <= 1.0, f"{what}: error {worst:.3f}x the fp16 half-ulp bound"
            return
        # bf16: rounding the exact value to the output dtype alone costs up to 2^-9 relative.
        atol = 2.0 ** -8 * top
        err, pt_err = (got - ref).abs().max().item(), (pt - ref).abs().max().item()
        assert err <= 2 * pt_err + atol, f"{what}: err {err:.3e} vs torch {pt_err:.3e} (atol {atol:.3e})"

    bound(y, pt_y, ref_y, "y")
    for k in ref_g:
        bound(g[k], pt_g[k], ref_g[k], f"d{k}")


# ----------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------
# Masked-off lanes of a partial tile hold x = 0, i.e. x − K = −1e4: exp overflows to inf there
# (never stored, never reduced); numpy warns about it under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("path", ["single", "looped"])
def test_large_offset(request, path):
    """1e4 ± 0.1: E[x²] − E[x]² in fp32 has nothing left (ulp(1e8) = 8 ≫ var = 3e-3), and even an
    fp32 mean is off by up to half an ulp of 1e4 (5e-4, 1 % of σ). The pivoted statistics keep
    x̂ to fp32 precision, so the fp32 kernel must match the fp64 composite tightly."""
    if path == "looped":
        request.getfixturevalue("looped")
    g = torch.Generator().manual_seed(11)
    B, C, G, spatial = 2, 8, 2, (5, 7)
    leaves = make_case(B, C, spatial, seed=12)
    leaves["x"] = (1e4 + 0.2 * torch.rand(B, C, *spatial, generator=g, dtype=torch.float64) - 0.1)
    inp = cast(leaves, torch.float32)
    exact = cast({k: v.detach().float().double() for k, v in inp.items()}, torch.float64, "cpu")
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, exact, G)
    y, gr = fwd_bwd(triton, inp, G)
    # the bounds of the ordinary fp32 tests (docs/kernels.md quotes them)
    assert_close64(y, ref_y, what="y")
    for k in ref_g:
        assert_close64(gr[k], ref_g[k], rtol=1e-4, atol_rel=1e-4, what=f"d{k}")
    # ... where PyTorch's own fp32 GroupNorm on the CPU (E[x²] − E[x]²) misses by far more
    x = inp["x"].detach().cpu()
    torch_err = (F.group_norm(x, G, eps=1e-5).double() - F.group_norm(x.double(), G, eps=1e-5)).abs().max().item()
    assert torch_err > 1e-3, torch_err


def test_gradcheck_fp64():
    leaves = cast(make_case(1, 4, (3, 3), seed=21), torch.float64)
    keys = sorted(leaves)

    def f(*ts):
        return call(triton, dict(zip(keys, ts)), 2)

    assert torch.autograd.gradcheck(f, [leaves[k] for k in keys], fast_mode=True)


def test_gradcheck_fp64_multi_tile(looped):
    leaves = cast(make_case(1, 6, (3, 3), seed=22, mods=("scale", "z_shift")), torch.float64)
    keys = sorted(leaves)

    def f(*ts):
        return call(triton, dict(zip(keys, ts)), 2, mods=("scale", "z_shift"))

    assert torch.autograd.gradcheck(f, [leaves[k] for k in keys], fast_mode=True)


def test_backward_is_deterministic():
    leaves = make_case(2, 16, (6, 7), seed=31)
    a = fwd_bwd(triton, cast(leaves, torch.float32), 4)[1]
    b = fwd_bwd(triton, cast(leaves, torch.float32), 4)[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# autograd plumbing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [("x",), ("emb_z",), ("x", "emb")], ids=["x", "z", "x+emb"])
def test_only_needed_gradients(trainable, monkeypatch):
    """Frozen weight/bias (the DDPM trunk) get no gradient and the kernel is told not to store it."""
    leaves = make_case(2, 8, (3, 5), seed=41)
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, cast(leaves, torch.float64, "cpu"), 2)
    inp = cast(leaves, torch.float32, grad=False)
    for k in trainable:
        inp[k].requires_grad_(True)
    seen = []
    real = agn._launch_bwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(agn, "_launch_bwd", spy)
    y = call(triton, inp, 2)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float().to(y.device)
    y.backward(dy)
    assert inp["weight"].grad is None and inp["bias"].grad is None
    bits = dict(zip(agn._GRAD_NAMES, ((seen[0] >> i) & 1 for i in range(7))))
    assert bits["weight"] == bits["bias"] == 0
    assert bits["x"] == ("x" in trainable)
    for k in trainable:
        assert_close64(inp[k].grad, ref_g[k], rtol=1e-4, atol_rel=1e-4, what=f"d{k}")


def test_no_grad_and_autocast():
    """Frozen path: no_grad + bf16 autocast. The op is autocast-transparent: bf16 x in, bf16 out,
    fp32 weight read as is; result within bf16 rounding of the fp32 composite."""
    leaves = make_case(2, 8, (4, 4), seed=51)
    x = leaves["x"].to(DEVICE, torch.bfloat16)
    w, b = leaves["weight"].to(DEVICE, torch.float32), leaves["bias"].to(DEVICE, torch.float32)
    s, sh = leaves["emb"].to(DEVICE, torch.bfloat16).chunk(2, 1)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = adaptive_group_norm(x, 4, w, b, scale=s, shift=sh)
    assert y.dtype == torch.bfloat16 and not y.requires_grad
    ref = adaptive_group_norm_ref(x.double(), 4, w.double(), b.double(), scale=s.double(), shift=sh.double())
    assert (y.double() - ref).abs().max().item() <= 2.0 ** -7 * ref.abs().max().item()


def test_torch_compile_fullgraph(monkeypatch):
    """A ResBlockShift-like step (conv → modulated GN+SiLU → conv), forward and backward, traced
    with fullgraph=True (a graph break would raise), with the fused op inside the compiled graph."""
    torch._dynamo.reset()
    launches = []
    for name in ("_launch_fwd", "_launch_bwd"):
        real = getattr(agn, name)
        monkeypatch.setattr(agn, name, lambda *a, _r=real, _n=name: launches.append(_n) or _r(*a))
    g = torch.Generator().manual_seed(61)
    C, B = 8, 2
    conv1 = torch.nn.Conv2d(C, C, 3, padding=1).to(DEVICE)
    conv2 = torch.nn.Conv2d(C, C, 3, padding=1).to(DEVICE)
    gn = torch.nn.GroupNorm(4, C).to(DEVICE)
    lin = torch.nn.Linear(16, 4 * C).to(DEVICE)

    def block(x, emb):
        h = conv1(x)
        scale, shift, z_scale, z_shift = lin(emb).chunk(4, dim=1)
        h = adaptive_group_norm(h, 4, gn.weight, gn.bias, scale=scale, shift=shift, z_scale=z_scale,
                                z_shift=z_shift, eps=gn.eps, act="silu")
        return x + conv2(h)

    x = torch.randn(B, C, 5, 6, generator=g).to(DEVICE).requires_grad_()
    emb = torch.randn(B, 16, generator=g).to(DEVICE)
    eager = block(x, emb)
    (eager_dx,) = torch.autograd.grad(eager.sum(), [x])
    # Inductor itself, never a quieter backend: on CPU it needs a C++ compiler, and a machine without
    # one fails here (Inductor raises) rather than passing on aot_eager. run_and_get_code returns
    # Inductor's generated code, which must call the custom op (proof it sits inside the graph).
    from torch._inductor.utils import run_and_get_code
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    launches.clear()

    def fwd_bwd_compiled():
        out = compiled(x, emb)
        return out, torch.autograd.grad(out.sum(), [x])[0]

    (out, dx), code = run_and_get_code(fwd_bwd_compiled)
    assert any("adaptive_group_norm_fwd" in c for c in code), "the fused op is not in Inductor's graph"
    assert any("adaptive_group_norm_bwd" in c for c in code), "the fused backward is not in Inductor's graph"
    assert launches == ["_launch_fwd", "_launch_bwd"], launches
    # Against the fp64 composite (independent of the kernel), not only against the eager kernel.
    ref = block_ref64(conv1, conv2, gn, lin, x, emb)
    (ref_dx,) = torch.autograd.grad(ref.sum(), [x])
    assert_close64(out, ref, rtol=1e-4, atol_rel=1e-4, what="y")
    assert_close64(dx, ref_dx.to(dx.device), rtol=1e-4, atol_rel=1e-4, what="dx")
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, eager_dx, rtol=1e-4, atol=1e-4)


def block_ref64(conv1, conv2, gn, lin, x, emb):
    """The same block in float64 on the CPU with the reference composite (x stays the leaf)."""
    import copy
    c1, c2, l = (copy.deepcopy(m).cpu().double() for m in (conv1, conv2, lin))
    x64 = x.double().cpu()
    h = c1(x64)
    scale, shift, z_scale, z_shift = l(emb.double().cpu()).chunk(4, dim=1)
    h = adaptive_group_norm_ref(h, 4, gn.weight.double().cpu(), gn.bias.double().cpu(), scale=scale, shift=shift,
                                z_scale=z_scale, z_shift=z_shift, eps=gn.eps, act="silu")
    return x64 + c2(h)


@pytest.mark.parametrize("mods", [(), MODS], ids=["plain", "all"])
def test_custom_ops_pass_opcheck(mods):
    """opcheck's default checks on both custom ops (schema, fake tensor, autograd registration, AOT
    dispatch with the registered autograd), the forward with inputs that require gradients."""
    leaves = cast(make_case(2, 8, (3, 4), mods=mods, seed=71), torch.float32)
    s = leaves["emb"].chunk(2, 1) if "emb" in leaves else (None, None)
    sz = leaves["emb_z"].chunk(2, 1) if "emb_z" in leaves else (None, None)
    x, w, b = leaves["x"], leaves["weight"], leaves["bias"]
    torch.library.opcheck(agn._agn_fwd_op, (x, 4, w, b, *s, *sz, 1e-5, True))
    with torch.no_grad():
        _, stats = agn._agn_fwd_op(x, 4, w, b, *s, *sz, 1e-5, True)
    dy = torch.randn_like(x)
    torch.library.opcheck(agn._agn_bwd_op, (dy, x.detach(), stats, w.detach(), b.detach(),
                                            *(t.detach() if t is not None else None for t in s + sz),
                                            4, True, 127))


# ----------------------------------------------------------------------------------------------
# compiled mode without a GPU
# ----------------------------------------------------------------------------------------------
_SM90_COMPILE = textwrap.dedent('''
    import sys
    import torch
    try:  # a stand-in driver so triton's JIT compiles for sm_90 here; it never launches anything
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver

        class FakeDriver:
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)
            def get_active_torch_device(self): return torch.device("cpu")

        driver.set_active(FakeDriver())
        import diti_fast.kernels.fused_norm as agn
        real = {n: getattr(agn, n) for n in ("_agn_fwd_kernel", "_agn_bwd_kernel")}
        assert all(hasattr(k, "run") for k in real.values())
    except Exception as e:
        print(f"cannot set up an sm_90 compile on this triton: {e!r}")
        sys.exit(3)

    class Warmup:  # kernel[grid](...) compiles (warmup=True) instead of launching
        def __init__(self, k): self.k = k
        def __getitem__(self, grid):
            return lambda *a, **kw: self.k.run(*a, grid=grid, warmup=True, **kw)

    for n, k in real.items():
        setattr(agn, n, Warmup(k))
    agn._INTERP_PLAN = False  # plan as on an H100/H200

    def both(x, G, mods, silu=True, needs=127):
        C = x.shape[1]
        w = torch.empty(C)
        s = torch.empty(x.shape[0], 2 * C, dtype=x.dtype).chunk(2, 1) if mods else (None, None)
        y, st = agn._launch_fwd(x, G, w, w, *s, *s, 1e-5, silu)
        agn._launch_bwd(torch.empty_like(x), x, st, w, w, *s, *s, G, silu, needs)

    bf16 = torch.bfloat16
    both(torch.empty(64, 128, 64, 64, dtype=bf16), 32, True)          # 64²: single fwd, looped bwd
    both(torch.empty(64, 256, 32, 32, dtype=bf16).contiguous(memory_format=torch.channels_last), 32, True)
    both(torch.empty(64, 512, 8, 8, dtype=bf16), 32, True)            # 2 groups per program
    cl = torch.channels_last
    both(torch.empty(128, 64, 32, 32, dtype=bf16).contiguous(memory_format=cl), 32, True)  # 8 / 4 groups, registers
    both(torch.empty(128, 64, 64, 64, dtype=bf16).contiguous(memory_format=cl), 32, True)  # bwd: 4 groups, two walks
    both(torch.empty(2, 12, 5, 7, dtype=torch.float64), 4, False, silu=False, needs=1)
    both(torch.empty(1, 1, 1, 1, dtype=torch.float16), 1, False)      # Cg = HW = 1 specialised to constexpr
    agn._GPB, agn._SINGLE_MAX_FWD, agn._SINGLE_MAX_BWD, agn._TILE, agn._MAX_BLOCK_C = 2, 0, 0, 64, 2
    both(torch.empty(2, 15, 3, 11), 3, True)                          # looped, masked group block
    print("ok")
''')


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every other test runs the compiled kernels")
def test_kernels_compile_for_sm90():
    """The interpreter accepts programs the compiler rejects (and vice versa): run Triton's real
    pipeline (TTIR → TTGIR → LLVM → PTX → ptxas) for sm_90 on the kernels at the celeba64 launch
    plans, fp32/bf16/fp16/fp64, channels_last, the looped path and constexpr-specialised sizes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# dispatch and validation
# ----------------------------------------------------------------------------------------------
def test_dispatch(monkeypatch):
    calls = []
    real = agn._launch_fwd
    monkeypatch.setattr(agn, "_launch_fwd", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 4, 3, 3, device=DEVICE)
    adaptive_group_norm(x, 2)                     # auto: CUDA or interpreter -> Triton
    assert len(calls) == 1
    y = adaptive_group_norm(x, 2, backend="ref")  # forced composite
    assert len(calls) == 1
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2)))
    with pytest.raises(ValueError, match="backend"):
        adaptive_group_norm(x, 2, backend="cuda")


def _bad(**over):
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    kw = dict(x=x, num_groups=4, weight=torch.ones(8, device=DEVICE), bias=torch.zeros(8, device=DEVICE),
              scale=torch.zeros(2, 8, device=DEVICE))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(2, 8, device=DEVICE)), "ndim"),
    (dict(num_groups=3), "not divisible by num_groups"),
    (dict(scale=torch.zeros(2, 4, device=DEVICE)), "scale must have shape"),
    (dict(z_shift=torch.zeros(8, device=DEVICE)), "z_shift must have shape"),
    (dict(shift=torch.zeros(1, 8, device=DEVICE)), "shift must have shape"),
    (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int32, device=DEVICE)), "dtype"),
    (dict(weight=torch.ones(8, dtype=torch.int64, device=DEVICE)), "weight has dtype"),
    (dict(bias=torch.zeros(4, device=DEVICE)), "bias must have shape"),
    (dict(act="relu"), "act"),
    (dict(num_groups=0), "num_groups"),
])
@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_bad_input_raises_before_launch(over, match, backend, monkeypatch):
    def no_launch(*a):
        raise AssertionError("kernel launched on bad input")

    monkeypatch.setattr(agn, "_launch_fwd", no_launch)
    kw = _bad(**over)
    x, G = kw.pop("x"), kw.pop("num_groups")
    with pytest.raises(ValueError, match=match):
        adaptive_group_norm(x, G, **kw, backend=backend)


# ----------------------------------------------------------------------------------------------
# the GPU launch plans under the interpreter: channels_last with several groups per program
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def one_sm(monkeypatch):
    """Plan CPU launches as on a GPU with one SM: the program-count floor then lets the tiny shapes
    here widen their channels_last blocks, as the real shapes do on a 132-SM H100."""
    monkeypatch.setattr(agn, "_INTERP_PLAN", False)
    monkeypatch.setattr(agn, "_CPU_SM_COUNT", 1)


def _tiled(monkeypatch):
    """Register tiles too small for any group block: the two-walk path with several spatial tiles,
    and an L2 budget that does not stop the channels_last widening."""
    monkeypatch.setattr(agn, "_SINGLE_MAX_FWD", 16)
    monkeypatch.setattr(agn, "_SINGLE_MAX_BWD", 16)
    monkeypatch.setattr(agn, "_TILE", 32)
    monkeypatch.setattr(agn, "_CL_L2_BYTES", 1 << 40)


@pytest.mark.parametrize("path", ["single", "tiled"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_plan_both_layouts(one_sm, monkeypatch, layout, path):
    # G = 6 (not a power of two: the last group block is partly masked), Cg = 2, H·W = 15.
    B, C, G, spatial = 2, 12, 6, (3, 5)
    if path == "tiled":
        _tiled(monkeypatch)
    fmt = torch.channels_last if layout == "nhwc" else None
    x = torch.empty(B, C, *spatial, device=DEVICE).contiguous(memory_format=fmt or torch.contiguous_format)
    for bwd in (False, True):
        plan = agn._plan(x, G, C // G, 15, bwd, layout == "nhwc")
        assert plan.single == (path == "single")
        if layout == "nhwc":
            # 2 channels of 4 bytes per group: the block widens to all 8 (padded) group slots,
            # 64 bytes of each pixel row, two of them masked.
            assert plan.gpb == 8 and plan.ngb == 1, plan
        if path == "tiled":
            assert plan.block_s < 15, plan  # several spatial tiles per walk
    y, g = check_fp32_against_fp64(B, C, spatial, G, memory_format=fmt)
    if layout == "nhwc":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g["x"].is_contiguous(memory_format=torch.channels_last)


def test_gpu_plan_nhwc_bf16(one_sm):
    """bf16 channels_last under the widened plan: within twice PyTorch's own bf16 error of the
    fp32 composite (plus bf16's rounding), as the default plan is held to."""
    B, C, G, spatial = 2, 16, 4, (3, 4)
    x = torch.empty(B, C, *spatial, device=DEVICE, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    assert agn._plan(x, G, C // G, 12, True, True).gpb > 1
    leaves = make_case(B, C, spatial, seed=9)
    low = cast(leaves, torch.bfloat16, "cpu", grad=False)
    ref_y, ref_g = fwd_bwd(adaptive_group_norm_ref, cast(low, torch.float32, "cpu"), G, dy_dtype=torch.bfloat16)
    pt_y, pt_g = fwd_bwd(adaptive_group_norm_ref, cast(low, torch.bfloat16, DEVICE, torch.channels_last), G,
                         dy_dtype=torch.bfloat16)
    y, g = fwd_bwd(triton, cast(low, torch.bfloat16, DEVICE, torch.channels_last), G, dy_dtype=torch.bfloat16)
    for what, got, pt, ref in [("y", y, pt_y, ref_y)] + [(f"d{k}", g[k], pt_g[k], ref_g[k]) for k in ref_g]:
        got, pt, ref = (t.detach().float().cpu() for t in (got, pt, ref))
        err, pt_err = (got - ref).abs().max().item(), (pt - ref).abs().max().item()
        assert err <= 2 * pt_err + 2.0 ** -8 * ref.abs().max().item(), f"{what}: {err:.3e} vs torch {pt_err:.3e}"


def test_eager_function_matches_the_custom_op(monkeypatch):
    """The eager autograd.Function and the custom op (what torch.compile traces) run the same
    launches: bitwise the same output and gradients."""
    leaves = make_case(2, 8, (3, 5), seed=13)
    runs = []
    for eager_fn in (True, False):
        monkeypatch.setattr(agn, "_EAGER_FUNCTION", eager_fn)
        inp = cast(leaves, torch.float32)
        launches = []
        real = agn._launch_bwd
        monkeypatch.setattr(agn, "_launch_bwd", lambda *a: launches.append(1) or real(*a))
        runs.append(fwd_bwd(triton, inp, 2))
        monkeypatch.setattr(agn, "_launch_bwd", real)
        assert launches == [1]
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


# ----------------------------------------------------------------------------------------------
# the launch plans at the presets' real shapes (pure Python: no kernel runs)
# ----------------------------------------------------------------------------------------------
def _preset_shapes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kernel_timing
    finally:
        sys.path.pop(0)
    return {p: kernel_timing.preset_norm_shapes(p) for p in ("celeba64", "ffhq128", "shapes32")}


REPO = Path(__file__).resolve().parents[1]
H100_SMS = 132
PLAN_CASES = [(p, B, e) for p in ("celeba64", "ffhq128", "shapes32") for B in (16, 128) for e in (2, 4)]


def _sector_cost(plan, Cg, e):
    """L2 traffic per useful byte of a channels_last launch: walks over x times the 32-byte
    sectors touched per pixel row over the bytes used."""
    run = plan.gpb * Cg * e
    return (1 if plan.single else 2) * (-(-run // 32) * 32) / run


@pytest.mark.parametrize("preset,B,e", PLAN_CASES, ids=[f"{p}-b{B}-{'bf16' if e == 2 else 'fp32'}"
                                                      for p, B, e in PLAN_CASES])
def test_channels_last_plan_at_preset_shapes(preset, B, e):
    G, sms = 32, H100_SMS
    floor = agn._CL_MIN_WAVES * sms
    improved = 0
    for C, R in _preset_shapes()[preset]:
        Cg, HW = C // G, R * R
        pc, ps = agn.next_pow2(Cg), agn.next_pow2(HW)
        for bwd in (False, True):
            single_max = agn._SINGLE_MAX_BWD if bwd else agn._SINGLE_MAX_FWD
            kw = dict(bwd=bwd, elem_size=e, sm_count=sms)
            cl = agn.launch_plan(B, G, Cg, HW, channels_last=True, **kw)
            nchw = agn.launch_plan(B, G, Cg, HW, channels_last=False, **kw)
            what = f"C={C} {R}x{R} bwd={bwd}: {cl}"
            # a power of two dividing G; a grid that covers every group exactly once
            assert cl.gpb & (cl.gpb - 1) == 0 and G % cl.gpb == 0 and cl.ngb * cl.gpb == G, what
            # never fewer programs than the floor, unless the NCHW plan already had fewer
            assert B * cl.ngb >= min(floor, B * nchw.ngb), what
            # a two-walk block wider than one group keeps the blocks of the resident programs
            # (2 per SM) within the L2 budget, so the second walk is served from L2
            if not cl.single and cl.gpb > 1:
                resident = min(B * cl.ngb, 2 * sms)
                assert resident * cl.gpb * Cg * HW * e <= agn._CL_L2_BYTES, what
            # whole sectors where the floor lets a register-resident block reach them: the smallest
            # block spanning 32 (64) bytes of a row, if it fits the floor and the register tile,
            # sets the minimum the plan must reach
            for target in (64, 32):
                g = 1
                while g * Cg * e < target:
                    g *= 2
                if g <= G and B * (G // g) >= floor and g * pc * ps <= single_max and pc <= agn._MAX_BLOCK_C:
                    assert cl.gpb * Cg * e >= target, f"{what}: {target} bytes per row were possible"
                    break
            # never more L2 traffic per useful byte than one group per program (the NCHW plan,
            # which channels_last used before)
            assert _sector_cost(cl, Cg, e) <= _sector_cost(nchw, Cg, e), what
            improved += _sector_cost(cl, Cg, e) < _sector_cost(nchw, Cg, e)
            # NCHW's plan does not depend on the channels_last knobs
            assert agn.launch_plan(B, G, Cg, HW, channels_last=False, **kw) == nchw
    assert improved > 0


def test_nchw_plan_ignores_channels_last_knobs(monkeypatch):
    before = [agn.launch_plan(128, 32, c // 32, r * r, bwd=b, channels_last=False, elem_size=2, sm_count=132)
              for c, r in _preset_shapes()["celeba64"] for b in (False, True)]
    monkeypatch.setattr(agn, "_CL_ROW_BYTES", 1 << 12)
    monkeypatch.setattr(agn, "_CL_MIN_WAVES", 0)
    monkeypatch.setattr(agn, "_CL_L2_BYTES", 1 << 40)
    after = [agn.launch_plan(128, 32, c // 32, r * r, bwd=b, channels_last=False, elem_size=2, sm_count=132)
             for c, r in _preset_shapes()["celeba64"] for b in (False, True)]
    assert after == before
    # ... while channels_last follows them (the knobs are read per call, past the plan cache)
    cl = agn.launch_plan(128, 32, 2, 64 * 64, bwd=False, channels_last=True, elem_size=2, sm_count=132)
    assert cl.gpb == 32


def test_plan_of_a_cpu_tensor_uses_the_fake_sm_count(monkeypatch):
    monkeypatch.setattr(agn, "_INTERP_PLAN", False)
    x = torch.empty(16, 128, 8, 8).contiguous(memory_format=torch.channels_last)
    for sms in (1, 132, 1000):
        monkeypatch.setattr(agn, "_CPU_SM_COUNT", sms)
        assert agn._plan(x, 32, 4, 64, False, True) == agn.launch_plan(
            16, 32, 4, 64, bwd=False, channels_last=True, elem_size=4, sm_count=sms)
