"""Fused noise-weighted DiTi loss (and the plain DDPM ε-loss) in one pass over the inputs.

DiTi's training loss is

    L = mean_{b,c,h,w}  w[t_b] · (ε − ε̂ − c[t_b]·G)²

with ``w`` and ``c`` float32 [T] schedule tables gathered by the per-sample time-step ``t`` and
gradient only to G (ε is noise, ε̂ comes from the frozen UNet under no_grad):

    dL/dG = −2 · w[t_b] · c[t_b] · (ε − ε̂ − c[t_b]·G) / N,       N = B·C·H·W.

Design (why it looks like this):

* **One read of every input.** The forward kernel loads ε, ε̂ and G once, accumulates the squared
  error in fp32 and writes dL/dG in G's dtype in the same pass; backward only rescales that
  buffer by the incoming scalar gradient. Against recomputing in backward this moves fewer bytes
  (read 3 + write 1, then read 1 + write 1, instead of read 3 + read 3 + write 1) and keeps one
  G-sized tensor alive until backward instead of the three inputs. When G does not need a
  gradient (evaluation), the kernel skips the store and no buffer is allocated.
* **Deterministic reductions, no atomics.** The grid is flat over (sample, block of C·H·W); each
  program writes its fp32 partial sum to its own slot of a [B, blocks] buffer. A second one-program
  kernel sums the partials in a fixed order into per-sample losses, the mean, and the per-t-bucket
  sums and counts (one-hot reduction, not scatter-add). Same inputs → bitwise the same outputs,
  which float atomics cannot promise; the second launch is tiny (B·blocks floats).
* **No host sync in the hot path.** Per-sample losses and bucket sums/counts stay on the device so
  the engine can accumulate them and log every N steps. The only sync is the optional range check
  of ``t`` (``check_t=True``, the default, reads min/max of t to raise a ValueError before launch);
  a training loop drawing ``t = randint(0, T)`` should pass ``check_t=False``. Unchecked, an
  out-of-range t never reads outside the tables: its sample's loss comes out NaN instead.

The public :func:`diti_loss` / :func:`ddpm_loss` dispatch to the Triton kernel when the tensors are
on CUDA or TRITON_INTERPRET=1, else to the eager reference :func:`diti_loss_ref` (same outputs).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from diti_fast.kernels._common import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["diti_loss", "diti_loss_ref", "ddpm_loss", "ddpm_loss_ref", "bucket_of"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _partial_kernel(eps_ptr, eps_hat_ptr, g_ptr, t_ptr, shift_ptr, weight_ptr,
                        grad_ptr, partial_ptr,
                        M, T, n_blocks, grad_scale,
                        HAS_EPS_HAT: tl.constexpr, HAS_TABLES: tl.constexpr,
                        STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # Flat grid: program p handles block p % n_blocks of sample p // n_blocks. A flat grid has
        # no 65535 limit on the second axis, so any per-sample size works.
        pid = tl.program_id(0)
        b = pid // n_blocks
        blk = pid - b * n_blocks
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        base = b.to(tl.int64) * M  # int64: B·C·H·W can exceed 2^31

        if HAS_TABLES:
            tb = tl.load(t_ptr + b).to(tl.int64)
            # Masked gather: an unchecked out-of-range t yields NaN (visible in the loss) instead
            # of reading past the end of the table.
            ok = (tb >= 0) & (tb < T)
            w = tl.load(weight_ptr + tb, mask=ok, other=float("nan")).to(tl.float32)
            c = tl.load(shift_ptr + tb, mask=ok, other=float("nan")).to(tl.float32)
        else:
            w = 1.0
            c = 1.0

        # All three loads are issued before any arithmetic so they are in flight together.
        e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_EPS_HAT:
            eh = tl.load(eps_hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            r = e - (eh + c * g)  # the original's order of operations
        else:
            r = e - c * g
        wr = w * r
        # Masked lanes loaded zeros, so r = 0 there (or NaN for a bad t, which is what we want).
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, wr * r, 0.0), axis=0))
        if STORE_GRAD:
            # grad_scale = -2 / N, folded with c on the scalar side: one multiply per element.
            gr = wr * (grad_scale * c)
            tl.store(grad_ptr + base + offs, gr.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _finalize_kernel(partial_ptr, t_ptr, loss_ptr, per_sample_ptr, bucket_sum_ptr, bucket_count_ptr,
                         B, n_blocks, T, num_buckets, inv_m, inv_b,
                         BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NB: tl.constexpr):
        # One program, fixed summation order: deterministic per-sample losses, mean and buckets.
        nb = tl.arange(0, BLOCK_NB)
        bucket_sum = tl.zeros([BLOCK_NB], dtype=tl.float32)
        bucket_count = tl.zeros([BLOCK_NB], dtype=tl.int32)
        total = tl.zeros([BLOCK_B], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            rmask = rows < B
            acc = tl.zeros([BLOCK_B], dtype=tl.float32)
            for p0 in range(0, n_blocks, BLOCK_P):
                cols = p0 + tl.arange(0, BLOCK_P)
                m2 = rmask[:, None] & (cols < n_blocks)[None, :]
                part = tl.load(partial_ptr + rows[:, None] * n_blocks + cols[None, :], mask=m2, other=0.0)
                acc += tl.sum(part, axis=1)
            per_sample = acc * inv_m
            tl.store(per_sample_ptr + rows, per_sample, mask=rmask)
            total += tl.where(rmask, per_sample, 0.0)
            tb = tl.load(t_ptr + rows, mask=rmask, other=0).to(tl.int64)
            valid = rmask & (tb >= 0) & (tb < T)
            # Only non-negative t reach the division, so truncating and flooring agree.
            bucket = tl.where(valid, tb * num_buckets // T, -1)
            hit = bucket[:, None] == nb[None, :]
            bucket_sum += tl.sum(tl.where(hit, per_sample[:, None], 0.0), axis=0)
            bucket_count += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(loss_ptr, tl.sum(total, axis=0) * inv_b)
        nmask = nb < num_buckets
        tl.store(bucket_sum_ptr + nb, bucket_sum, mask=nmask)
        tl.store(bucket_count_ptr + nb, bucket_count.to(tl.int64), mask=nmask)


def _block_for(m: int) -> tuple[int, int]:
    """Elements per program and warps: 2048 elements keep 16 per thread (two 16-byte loads of
    bf16, four of fp32) with 4 warps, and give B·⌈M/2048⌉ programs, enough to fill an H200 at
    B = 128 and 3×64×64."""
    block = min(2048, max(128, next_pow2(m)))
    return block, 4 if block >= 1024 else 2


@functools.lru_cache(maxsize=256)
def _launch_config(b: int, m: int, num_buckets: int) -> tuple[int, int, int, int, int, int]:
    """(block, warps, n_blocks, BLOCK_B, BLOCK_P, BLOCK_NB) of a launch over b samples of m elements;
    cached: a training run asks for the same one or two every step."""
    block, warps = _block_for(m)
    n_blocks = -(-m // block)
    block_nb = max(2, next_pow2(num_buckets))
    block_p = min(64, max(2, next_pow2(n_blocks)))
    # Keep the one-hot [BLOCK_B, BLOCK_NB] and partial [BLOCK_B, BLOCK_P] tiles in registers.
    block_b = max(2, min(128, next_pow2(b), 4096 // max(block_nb, block_p)))
    return block, warps, n_blocks, block_b, block_p, block_nb


def _launch(eps, eps_hat, g, t, shift_coef, weight, num_buckets: int, timesteps: int, need_grad: bool):
    b = g.shape[0]
    m = g.numel() // b
    block, warps, n_blocks, block_b, block_p, block_nb = _launch_config(b, m, num_buckets)
    dev = g.device
    partial = torch.empty(b * n_blocks, device=dev, dtype=torch.float32)
    grad = torch.empty_like(g) if need_grad else g.new_empty((0,))
    has_tables = shift_coef is not None
    _partial_kernel[(b * n_blocks,)](
        eps, eps_hat if eps_hat is not None else eps, g, t,
        shift_coef if has_tables else g, weight if has_tables else g,
        grad if need_grad else g, partial,
        m, timesteps, n_blocks, -2.0 / (b * m),
        HAS_EPS_HAT=eps_hat is not None, HAS_TABLES=has_tables, STORE_GRAD=need_grad,
        BLOCK=block, num_warps=warps)

    loss = torch.empty((), device=dev, dtype=torch.float32)
    per_sample = torch.empty(b, device=dev, dtype=torch.float32)
    bucket_sum = torch.empty(num_buckets, device=dev, dtype=torch.float32)
    bucket_count = torch.empty(num_buckets, device=dev, dtype=torch.int64)
    _finalize_kernel[(1,)](
        partial, t, loss, per_sample, bucket_sum, bucket_count,
        b, n_blocks, timesteps, num_buckets, 1.0 / m, 1.0 / b,
        BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_NB=block_nb, num_warps=4)
    return loss, per_sample, bucket_sum, bucket_count, grad


# --------------------------------------------------------------------------- eager maths

def bucket_of(t: torch.Tensor, timesteps: int, num_buckets: int) -> torch.Tensor:
    """The monitoring bucket of each time-step: t · num_buckets // T (equal-width t ranges)."""
    return torch.div(t.long() * num_buckets, timesteps, rounding_mode="floor")


def _bucket_stats(per_sample: torch.Tensor, t: torch.Tensor, timesteps: int, num_buckets: int):
    # One-hot product rather than index_add_/bincount(weights=...): those use float atomics on
    # CUDA, and the reference should be as deterministic as the kernel.
    onehot = bucket_of(t, timesteps, num_buckets)[:, None] == torch.arange(num_buckets, device=t.device)
    return per_sample @ onehot.to(per_sample.dtype), onehot.sum(0)


def _eager(eps, eps_hat, g, t, shift_coef, weight, num_buckets: int, timesteps: int):
    """The loss graph in torch ops, fp32 accumulation; autograd flows to g only.

    Same operations in the same order as the original, w·(ε − (ε̂ + c·G))², so that on fp32
    inputs the reference path reproduces the original's loss to the bit.
    """
    b = g.shape[0]
    eps = eps.detach().float()
    if shift_coef is not None:
        view = (b,) + (1,) * (g.ndim - 1)
        c = shift_coef[t.long()].float().view(view)
        w = weight[t.long()].float().view(view)
        elem = w * (eps - (eps_hat.detach().float() + c * g.float())) ** 2
    else:
        elem = (eps - g.float()) ** 2
    per_sample = elem.detach().reshape(b, -1).mean(1)
    bucket_sum, bucket_count = _bucket_stats(per_sample, t, timesteps, num_buckets)
    return elem.mean(), per_sample, bucket_sum, bucket_count


# --------------------------------------------------------------------------- custom op + autograd

def _forward(eps, eps_hat, g, t, shift_coef, weight, num_buckets: int, timesteps: int,
             need_grad: bool, check_t: bool):
    """(loss, per_sample, bucket_sum, bucket_count, dL/dg or an empty tensor)."""
    if check_t:
        # In the op body rather than the Python wrapper: the body runs eagerly even inside a
        # torch.compile graph, so the check costs no graph break. It is the one host sync.
        _check_t_range(t, timesteps)
    if use_triton(g):
        return _launch(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, need_grad)
    # A direct call on a CPU tensor without the interpreter: the same outputs in torch ops, with
    # the closed-form gradient (autograd does not record inside an op body).
    loss, per_sample, bucket_sum, bucket_count = _eager(eps, eps_hat, g.detach(), t, shift_coef, weight,
                                                        num_buckets, timesteps)
    grad = g.new_empty((0,))
    if need_grad:
        if shift_coef is not None:
            view = (g.shape[0],) + (1,) * (g.ndim - 1)
            c = shift_coef[t.long()].float().view(view)
            r = eps.float() - (eps_hat.float() + c * g.float())
            grad = (-2.0 / g.numel()) * weight[t.long()].float().view(view) * c * r
        else:
            grad = (-2.0 / g.numel()) * (eps.float() - g.float())
        grad = grad.to(g.dtype)
    return loss, per_sample, bucket_sum, bucket_count, grad


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[4])


def _backward(ctx, d_loss, *unused):
    # The kernel already produced dL/dg; backward is one scalar rescale, out of place so that a
    # retain_graph second backward finds the buffer intact. For a half-precision g the scale is
    # rounded to g's dtype (exact for 1 and powers of two such as loss-scaler factors; any other
    # constant factor is a uniform rescale, which Adam does not see).
    (grad,) = ctx.saved_tensors
    d_g = grad * d_loss if ctx.needs_input_grad[2] else None
    return None, None, d_g, None, None, None, None, None, None, None


# The custom op is what torch.compile traces (opaque to Inductor, with a fake implementation for
# shapes and the registered autograd for AOTAutograd). Eager calls take the autograd.Function
# below instead: the same forward and backward, without custom_op's Python dispatch layers, which
# cost more host time than the kernels themselves take at training sizes.
@torch.library.custom_op("diti_fast::diti_loss_fwd", mutates_args=())
def _diti_loss_fwd(eps: torch.Tensor, eps_hat: Optional[torch.Tensor], g: torch.Tensor, t: torch.Tensor,
                   shift_coef: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   num_buckets: int, timesteps: int, need_grad: bool, check_t: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per_sample, bucket_sum, bucket_count, dL/dg or an empty tensor)."""
    return _forward(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, need_grad, check_t)


@_diti_loss_fwd.register_fake
def _(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, need_grad, check_t):
    b = g.shape[0]
    return (g.new_empty((), dtype=torch.float32), g.new_empty((b,), dtype=torch.float32),
            g.new_empty((num_buckets,), dtype=torch.float32), g.new_empty((num_buckets,), dtype=torch.int64),
            torch.empty_like(g) if need_grad else g.new_empty((0,)))


torch.library.register_autograd("diti_fast::diti_loss_fwd", _backward, setup_context=_setup_context)


class _DitiLossFunction(torch.autograd.Function):
    """Eager twin of the custom op (same _forward / _setup_context / _backward)."""

    @staticmethod
    def forward(ctx, *args):
        output = _forward(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


# --------------------------------------------------------------------------- validation

def _check_t_range(t: torch.Tensor, timesteps: int) -> None:
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one sync, not two
    if lo < 0 or hi >= timesteps:
        raise ValueError(f"t must lie in [0, {timesteps}) (the length of the schedule tables), "
                         f"got values in [{lo}, {hi}]")


def _validate(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps) -> int:
    """Every check that needs no tensor values; returns T. Raises ValueError naming the argument."""
    if not isinstance(g, torch.Tensor):
        raise ValueError(f"g must be a tensor, got {type(g).__name__}")
    named = [("g", g), ("eps", eps)] + ([("eps_hat", eps_hat)] if eps_hat is not None else [])
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.shape != g.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but g has shape {tuple(g.shape)}; "
                             "eps, eps_hat and g must match")
        if x.device != g.device:
            raise ValueError(f"{name} is on {x.device} but g is on {g.device}")
    if g.ndim < 1 or g.numel() == 0:
        raise ValueError(f"g must be a non-empty [B, ...] tensor, got shape {tuple(g.shape)}")
    if not isinstance(t, torch.Tensor) or t.dtype not in _INTS:
        raise ValueError(f"t must be an integer tensor, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.shape != (g.shape[0],):
        raise ValueError(f"t must have shape [B] = ({g.shape[0]},) (one time-step per sample), "
                         f"got {tuple(t.shape)}")
    if t.device != g.device:
        raise ValueError(f"t is on {t.device} but g is on {g.device}")
    if shift_coef is not None:
        for name, x in (("shift_coef", shift_coef), ("weight", weight)):
            if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.numel() == 0:
                raise ValueError(f"{name} must be a non-empty 1-D [T] table, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point table, got {x.dtype}")
            if x.device != g.device:
                raise ValueError(f"{name} is on {x.device} but g is on {g.device}")
        if weight.shape != shift_coef.shape:
            raise ValueError(f"weight has length {weight.shape[0]} but shift_coef has length "
                             f"{shift_coef.shape[0]}; both tables must have one entry per time-step")
        if timesteps is not None and shift_coef.shape[0] != timesteps:
            raise ValueError(f"shift_coef and weight have length {shift_coef.shape[0]} but timesteps={timesteps}")
        timesteps = shift_coef.shape[0]
    elif not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
    if not isinstance(num_buckets, int) or not 1 <= num_buckets <= timesteps:
        raise ValueError(f"num_buckets must be an int in [1, T={timesteps}], got {num_buckets!r}")
    return timesteps


# --------------------------------------------------------------------------- public API

def _run(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, check_t):
    timesteps = _validate(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps)
    if not use_triton(g):
        return _reference(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, check_t)
    # The kernels index each sample's elements as one flat run of memory: dense layouts only.
    eps, eps_hat, g = _same_dense_layout(eps, eps_hat, g)
    args = [x.contiguous() if x is not None else None for x in (eps, eps_hat, g, t, shift_coef, weight)]
    need_grad = g.requires_grad and torch.is_grad_enabled()
    op = _diti_loss_fwd if torch.compiler.is_compiling() else _DitiLossFunction.apply
    loss, per_sample, bucket_sum, bucket_count, _ = op(*args, num_buckets, timesteps, need_grad, check_t)
    return loss, per_sample, bucket_sum, bucket_count


def _same_dense_layout(*xs):
    """The image tensors as views the kernels can read in memory order, without a copy.

    A channels_last [B, C, H, W] batch is dense too: its NHWC permutation is contiguous and holds
    each sample's C·H·W elements in one run, which is all the loss needs (it is a sum over them;
    dL/dG comes back in the same layout through the permutation). Other layouts, or a mix, fall
    through to ``.contiguous()`` (a copy where they are not contiguous already)."""
    present = [x for x in xs if x is not None]
    if all(x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
           for x in present):
        return [x.permute(0, 2, 3, 1) if x is not None else None for x in xs]
    return list(xs)


def _reference(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, check_t):
    if check_t and not torch.compiler.is_compiling():  # .item() would break a compiled graph
        _check_t_range(t, timesteps)
    return _eager(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps)


def diti_loss(eps: torch.Tensor, eps_hat: torch.Tensor, g: torch.Tensor, t: torch.Tensor,
              shift_coef: torch.Tensor, weight: torch.Tensor, num_buckets: int = 10,
              check_t: bool = True, timesteps: int | None = None):
    """DiTi's loss mean(w[t]·(eps − eps_hat − shift_coef[t]·g)²) with gradient to g only.

    Args:
        eps, eps_hat, g: [B, ...] tensors of one shape (fp32 / bf16 / fp16; accumulation is fp32).
        t: integer [B] time-steps in [0, T).
        shift_coef, weight: [T] schedule tables (c_t and w_t).
        num_buckets: monitoring buckets; bucket = t · num_buckets // T.
        check_t: raise ValueError for t outside [0, T) (one host sync on CUDA; pass False in a
            training loop whose t comes from randint(0, T): an unchecked bad t gives a NaN loss).
        timesteps: optional expected T, to catch tables of the wrong length.

    Returns:
        loss (0-dim fp32, differentiable w.r.t. g; dL/dg has g's dtype), per_sample [B] fp32 (the
        mean over C·H·W of each sample's terms), bucket_sum [num_buckets] fp32 (sum of per_sample
        per bucket) and bucket_count [num_buckets] int64; the last three carry no gradient.
    """
    return _run(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, check_t)


def ddpm_loss(eps: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor, timesteps: int = 1000,
              num_buckets: int = 10, check_t: bool = True):
    """The plain DDPM ε-loss mean((eps − eps_pred)²), gradient to eps_pred; same outputs as diti_loss.

    The same kernel with ε̂ = 0 and c = w = 1, specialised at compile time so it reads neither a
    zero tensor nor the tables; ``t`` is only used for the monitoring buckets.
    """
    return _run(eps, None, eps_pred, t, None, None, num_buckets, timesteps, check_t)


def diti_loss_ref(eps, eps_hat, g, t, shift_coef, weight, num_buckets: int = 10,
                  check_t: bool = True, timesteps: int | None = None):
    """Eager torch reference of :func:`diti_loss` (same validation, same outputs); the CPU path."""
    timesteps = _validate(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps)
    return _reference(eps, eps_hat, g, t, shift_coef, weight, num_buckets, timesteps, check_t)


def ddpm_loss_ref(eps, eps_pred, t, timesteps: int = 1000, num_buckets: int = 10, check_t: bool = True):
    """Eager torch reference of :func:`ddpm_loss`."""
    _validate(eps, None, eps_pred, t, None, None, num_buckets, timesteps)
    return _reference(eps, None, eps_pred, t, None, None, num_buckets, timesteps, check_t)
