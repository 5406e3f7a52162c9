"""Fused DiTi / DDPM loss kernel against closed-form references written here (float64 formula,
bincount buckets). On CPU the Triton kernel runs under TRITON_INTERPRET=1: shapes stay tiny."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the kernel module's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from diti_fast.config import DiffusionConfig  # noqa: E402
from diti_fast.diffusion import make_schedule  # noqa: E402
from diti_fast.kernels._common import INTERPRET, use_triton  # noqa: E402
from diti_fast.kernels.fused_loss import ddpm_loss, diti_loss, diti_loss_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 1000
SCHED = make_schedule(DiffusionConfig(timesteps=T), device=DEVICE)
needs_kernel = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def formula(eps, eps_hat, g, t, c_tab, w_tab):
    """float64 loss, per-sample losses and dL/dg from the closed forms."""
    b, n = g.shape[0], g.numel()
    view = (b,) + (1,) * (g.ndim - 1)
    c = c_tab.double()[t].view(view)
    w = w_tab.double()[t].view(view)
    r = eps.double() - eps_hat.double() - c * g.double()
    elem = w * r * r
    return elem.mean(), elem.reshape(b, -1).mean(1), -2.0 * w * c * r / n


def bucket_reference(per_sample, t, num_buckets):
    bucket = (t.cpu() * num_buckets) // T
    return (torch.bincount(bucket, weights=per_sample.cpu().double(), minlength=num_buckets),
            torch.bincount(bucket, minlength=num_buckets))


def make_inputs(shape, dtype, seed=0, t=None):
    gen = torch.Generator().manual_seed(seed)
    eps, eps_hat, g = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    if t is None:
        t = torch.randint(0, T, (shape[0],), generator=gen)
    return eps, eps_hat, g.requires_grad_(), t.to(DEVICE)


SHAPES = [(3, 3, 5, 7), (1, 4, 6, 6), (2, 1, 13), (4, 3, 33, 65)]  # odd sizes, B = 1, a multi-block sample


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_formula(shape):
    eps, eps_hat, g, t = make_inputs(shape, torch.float32)
    t[0] = 0  # c_0 = 0: include the edge where the sample does not depend on g
    loss, per_sample, bsum, bcnt = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    loss.backward()
    ref_loss, ref_ps, ref_grad = formula(eps, eps_hat, g.detach(), t, SCHED.shift_coef, SCHED.weight)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert g.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(per_sample.double(), ref_ps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.grad.double(), ref_grad, rtol=1e-5, atol=1e-7 * ref_grad.abs().max().item())
    ref_bsum, ref_bcnt = bucket_reference(ref_ps, t, 10)
    torch.testing.assert_close(bsum.cpu().double(), ref_bsum, rtol=1e-5, atol=1e-7)
    assert torch.equal(bcnt.cpu(), ref_bcnt)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_half_inputs_give_fp32_accurate_outputs(shape, dtype):
    """Half-precision inputs, fp32 accumulation: loss and per-sample losses are fp32 outputs and must
    match float64 on the SAME rounded inputs to fp32 accuracy (not to the input dtype's ~1%); dL/dG is
    stored in G's dtype, so it is held to half an ulp of that dtype on top of fp32 accuracy."""
    eps, eps_hat, g, t = make_inputs(shape, dtype, seed=1)
    loss, per_sample, bsum, _ = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    loss.backward()
    assert loss.dtype == per_sample.dtype == torch.float32 and g.grad.dtype == dtype
    ref_loss, ref_ps, ref_grad = formula(eps, eps_hat, g.detach(), t, SCHED.shift_coef, SCHED.weight)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(per_sample.double(), ref_ps, rtol=2e-6, atol=0)
    # One ulp of G's dtype is at most 2^-7 (bf16) / 2^-10 (fp16) of the value, and fp16's subnormal
    # spacing 2^-24 below its normal range (tiny w_t·c_t at small t reaches it). Compiled Triton rounds
    # the fp32 gradient to nearest (half an ulp); Triton's interpreter truncates fp32 -> bf16 (one ulp).
    ulp, tiny = (2.0 ** -7, 0.0) if dtype == torch.bfloat16 else (2.0 ** -10, 2.0 ** -24)
    rounding = 1.0 if (INTERPRET and not g.is_cuda) else 0.5
    err = (g.grad.double() - ref_grad).abs()
    assert (err <= rounding * (ulp * ref_grad.abs() + tiny) + 2e-6 * ref_grad.abs()).all()


@needs_kernel
def test_t_zero_makes_loss_independent_of_g():
    assert SCHED.shift_coef[0].item() == 0.0
    eps, eps_hat, g, _ = make_inputs((2, 3, 4, 5), torch.float32, seed=2)
    t = torch.zeros(2, dtype=torch.long, device=DEVICE)
    loss, *_ = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    loss.backward()
    assert torch.count_nonzero(g.grad) == 0
    other, *_ = diti_loss(eps, eps_hat, 10 * torch.randn_like(g), t, SCHED.shift_coef, SCHED.weight)
    assert torch.equal(loss.detach(), other)
    expected = (SCHED.weight[0].double() * (eps.double() - eps_hat.double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


@needs_kernel
@pytest.mark.parametrize("num_buckets", [1, 7, 10, 1000])
def test_bucket_sums_match_bincount(num_buckets):
    # B = 70 spans more than one row tile of the finalize kernel when buckets are many.
    eps, eps_hat, g, t = make_inputs((70, 2, 3), torch.float32, seed=3)
    t[:3] = torch.tensor([0, T - 1, T // 2])
    _, per_sample, bsum, bcnt = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight,
                                          num_buckets=num_buckets)
    _, ref_ps, _ = formula(eps, eps_hat, g.detach(), t, SCHED.shift_coef, SCHED.weight)
    ref_bsum, ref_bcnt = bucket_reference(ref_ps, t, num_buckets)
    assert bsum.shape == (num_buckets,) and bcnt.dtype == torch.int64
    torch.testing.assert_close(bsum.cpu().double(), ref_bsum, rtol=1e-5, atol=1e-7)
    assert torch.equal(bcnt.cpu(), ref_bcnt) and bcnt.sum().item() == 70


@needs_kernel
def test_ddpm_loss_matches_formula():
    eps, _, pred, t = make_inputs((3, 3, 7, 5), torch.float32, seed=4)
    loss, per_sample, bsum, bcnt = ddpm_loss(eps, pred, t)
    loss.backward()
    r = eps.double() - pred.detach().double()
    torch.testing.assert_close(loss.double(), (r * r).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_sample.double(), (r * r).reshape(3, -1).mean(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(pred.grad.double(), -2 * r / r.numel(), rtol=1e-5, atol=1e-9)
    ref_bsum, ref_bcnt = bucket_reference((r * r).reshape(3, -1).mean(1), t, 10)
    torch.testing.assert_close(bsum.cpu().double(), ref_bsum, rtol=1e-5, atol=0)
    assert torch.equal(bcnt.cpu(), ref_bcnt)


@needs_kernel
def test_gradient_only_to_g_and_scaled_by_upstream():
    eps, eps_hat, g, t = make_inputs((2, 3, 5, 3), torch.float32, seed=5)
    eps_hat.requires_grad_()
    loss, per_sample, bsum, bcnt = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    assert not (per_sample.requires_grad or bsum.requires_grad or bcnt.requires_grad)
    (3.0 * loss).backward(retain_graph=True)
    first = g.grad.clone()
    assert eps_hat.grad is None
    _, _, ref_grad = formula(eps, eps_hat.detach(), g.detach(), t, SCHED.shift_coef, SCHED.weight)
    torch.testing.assert_close(first.double(), 3 * ref_grad, rtol=1e-5, atol=1e-9)
    g.grad = None
    loss.backward()  # retain_graph: the saved gradient must not have been rescaled in place
    torch.testing.assert_close(3 * g.grad, first)


@needs_kernel
def test_no_grad_and_deterministic():
    eps, eps_hat, g, t = make_inputs((5, 3, 9, 9), torch.float32, seed=6)
    with torch.no_grad():
        a = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    b = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    assert not a[0].requires_grad and b[0].requires_grad
    for x, y in zip(a, b):
        assert torch.equal(x, y.detach())  # bitwise: no atomics anywhere


@needs_kernel
def test_reference_path_agrees_with_kernel():
    eps, eps_hat, g, t = make_inputs((3, 2, 5, 5), torch.float32, seed=7)
    g2 = g.detach().clone().requires_grad_()
    out = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight, num_buckets=4)
    ref = diti_loss_ref(eps, eps_hat, g2, t, SCHED.shift_coef, SCHED.weight, num_buckets=4)
    out[0].backward()
    ref[0].backward()
    for x, y in zip(out, ref):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.grad, g2.grad, rtol=1e-5, atol=1e-9)


@needs_kernel
def test_custom_op_eager_autograd_matches_fast_path():
    # Eager calls go through an autograd.Function; the custom op (what torch.compile sees) must
    # give the same outputs and gradient through its registered autograd.
    from diti_fast.kernels.fused_loss import _diti_loss_fwd
    eps, eps_hat, g, t = make_inputs((3, 2, 7), torch.float32, seed=13)
    g2 = g.detach().clone().requires_grad_()
    out = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)
    op_out = _diti_loss_fwd(eps, eps_hat, g2, t, SCHED.shift_coef, SCHED.weight, 10, T, True, True)
    (2 * out[0]).backward()
    (2 * op_out[0]).backward()
    for x, y in zip(out, op_out[:4]):
        assert torch.equal(x.detach(), y.detach())
    assert torch.equal(g.grad, g2.grad)


def test_reference_is_bitwise_the_original_formula():
    # The eager path is what runs with fused_loss off: it must be the original's loss exactly.
    eps, eps_hat, g, t = make_inputs((4, 3, 6, 6), torch.float32, seed=14)
    view = (4, 1, 1, 1)
    original = (SCHED.weight[t].view(view) * (eps - (eps_hat + SCHED.shift_coef[t].view(view) * g)) ** 2).mean()
    assert torch.equal(diti_loss_ref(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight)[0], original)


@needs_kernel
def test_unchecked_out_of_range_t_gives_nan_not_a_wild_read():
    eps, eps_hat, g, t = make_inputs((3, 2, 4), torch.float32, seed=8)
    t[1] = T
    loss, per_sample, _, bcnt = diti_loss(eps, eps_hat, g, t, SCHED.shift_coef, SCHED.weight, check_t=False)
    assert torch.isnan(loss) and torch.isnan(per_sample[1])
    assert torch.isfinite(per_sample[[0, 2]]).all() and bcnt.sum().item() == 2


@needs_kernel
@pytest.mark.parametrize("eps_hat_and_tables", [True, False], ids=["diti", "ddpm"])
def test_custom_op_passes_opcheck_with_autograd(eps_hat_and_tables):
    # All of opcheck's default checks: schema, fake tensor, autograd registration and AOT dispatch
    # (the registered backward traced as torch.compile would), with g requiring a gradient.
    from diti_fast.kernels.fused_loss import _diti_loss_fwd
    eps, eps_hat, g, t = make_inputs((2, 3, 4), torch.float32, seed=9)
    tables = (SCHED.shift_coef, SCHED.weight) if eps_hat_and_tables else (None, None)
    torch.library.opcheck(_diti_loss_fwd, (eps, eps_hat if eps_hat_and_tables else None, g, t, *tables,
                                           10, T, True, True))


@needs_kernel
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck():
    """Finite differences of the op (forward kernel) against its analytic backward (the gradient the
    kernel stored). The loss is quadratic in g, so central differences are exact up to fp32 rounding
    of the loss: eps = 1e-2 keeps that rounding (~1e-7 / 1e-2) far below atol."""
    eps, eps_hat, g, t = make_inputs((2, 3, 4), torch.float32, seed=15)

    def loss_of(gg):
        return diti_loss(eps, eps_hat, gg, t, SCHED.shift_coef, SCHED.weight)[0]

    def ddpm_of(gg):
        return ddpm_loss(eps, gg, t)[0]

    for fn in (loss_of, ddpm_of):
        assert torch.autograd.gradcheck(fn, (g,), eps=1e-2, atol=2e-4, rtol=1e-3, nondet_tol=0.0)


@needs_kernel
def test_compiles_fullgraph():
    eps, eps_hat, g, t = make_inputs((2, 3, 5, 5), torch.float32, seed=10)

    @torch.compile(fullgraph=True)
    def step(eps, eps_hat, g, t):
        loss, per_sample, bsum, bcnt = diti_loss(eps, eps_hat, 2 * g, t, SCHED.shift_coef, SCHED.weight)
        return loss, bsum

    loss, bsum = step(eps, eps_hat, g, t)
    loss.backward()
    ref_loss, ref_ps, ref_grad = formula(eps, eps_hat, 2 * g.detach(), t, SCHED.shift_coef, SCHED.weight)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.grad.double(), 2 * ref_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(bsum.cpu().double(), bucket_reference(ref_ps, t, 10)[0], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- bad input

def _good():
    eps, eps_hat, g, t = make_inputs((2, 3, 4, 4), torch.float32, seed=11)
    return dict(eps=eps, eps_hat=eps_hat, g=g, t=t, shift_coef=SCHED.shift_coef, weight=SCHED.weight)


BAD = {
    "eps_hat shape": (dict(eps_hat=torch.zeros(2, 3, 4, 5, device=DEVICE)), "eps_hat has shape"),
    "eps shape": (dict(eps=torch.zeros(2, 3, 16, device=DEVICE)), "eps has shape"),
    "eps dtype": (dict(eps=torch.zeros(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)), "eps must be float32"),
    "t float": (dict(t=torch.zeros(2, device=DEVICE)), "t must be an integer"),
    "t shape": (dict(t=torch.zeros(3, dtype=torch.long, device=DEVICE)), r"t must have shape \[B\]"),
    "t too big": (dict(t=torch.tensor([0, T], device=DEVICE)), r"t must lie in \[0, 1000\)"),
    "t negative": (dict(t=torch.tensor([-1, 5], device=DEVICE)), r"t must lie in \[0, 1000\)"),
    "weight length": (dict(weight=SCHED.weight[:-1]), "weight has length 999 but shift_coef has length 1000"),
    "table 2-D": (dict(shift_coef=SCHED.shift_coef.view(10, 100)), "shift_coef must be a non-empty 1-D"),
    "timesteps": (dict(timesteps=500), "length 1000 but timesteps=500"),
    "num_buckets": (dict(num_buckets=0), "num_buckets must be"),
}


@pytest.mark.parametrize("fn", [diti_loss, diti_loss_ref], ids=["dispatch", "ref"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_value_error_naming_it(case, fn):
    change, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        fn(**{**_good(), **change})


def test_ddpm_bad_input():
    eps, _, pred, t = make_inputs((2, 3, 4), torch.float32, seed=12)
    with pytest.raises(ValueError, match="eps has shape"):
        ddpm_loss(eps[:, :2], pred, t)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 50\)"):
        ddpm_loss(eps, pred, torch.tensor([3, 50], device=DEVICE), timesteps=50)


# --------------------------------------------------------------------------- GPU build without a GPU

_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import diti_fast.kernels.fused_loss as D

def build(fn, sig, **constexprs):
    ce = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    triton.compile(ASTSource(fn, dict(sig, **{k: "constexpr" for k in constexprs}), ce),
                   target=GPUTarget("cuda", 90, 32))

for dt, full in (("bf16", True), ("fp32", False)):
    build(D._partial_kernel, {"eps_ptr": f"*{dt}", "eps_hat_ptr": f"*{dt}", "g_ptr": f"*{dt}", "t_ptr": "*i64",
                              "shift_ptr": "*fp32", "weight_ptr": "*fp32", "grad_ptr": f"*{dt}",
                              "partial_ptr": "*fp32", "M": "i32", "T": "i32", "n_blocks": "i32", "grad_scale": "fp32"},
          HAS_EPS_HAT=full, HAS_TABLES=full, STORE_GRAD=True, BLOCK=2048)
build(D._finalize_kernel, {"partial_ptr": "*fp32", "t_ptr": "*i64", "loss_ptr": "*fp32", "per_sample_ptr": "*fp32",
                           "bucket_sum_ptr": "*fp32", "bucket_count_ptr": "*i64", "B": "i32", "n_blocks": "i32",
                           "T": "i32", "num_buckets": "i32", "inv_m": "fp32", "inv_b": "fp32"},
      BLOCK_B=128, BLOCK_P=8, BLOCK_NB=16)
print("ok")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above run the compiled kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts things the compiler rejects; compile the real thing ahead of time
    # (Triton's bundled ptxas, no driver needed) so a GPU-only error shows up on CPU CI.
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
