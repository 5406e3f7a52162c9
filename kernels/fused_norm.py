"""Fused masked-chunk-conditioned adaptive GroupNorm + SiLU (forward and backward) in Triton.

    y = act((1 + z_scale) * ((GN(x) * weight + bias) * (1 + scale) + shift) + z_shift)

with ``scale, shift, z_scale, z_shift`` of shape [B, C] (each optional) broadcast over the trailing
(spatial) dims of ``x`` [B, C, *spatial], and ``act`` "silu" or None. This covers every GroupNorm in
the guided-diffusion UNet: ResBlockShift (all four), ResBlock (scale/shift), GN+SiLU (none) and the
attention block's plain GN (none, act=None).

Public API
----------
``adaptive_group_norm(...)``      dispatch: Triton on CUDA (or on CPU under TRITON_INTERPRET=1),
                                   the reference composite elsewhere; ``backend=`` forces either.
``adaptive_group_norm_ref(...)``  the reference composite, op for op what the original DiTi code
                                   computes (also the eager baseline of the benchmarks).
``adaptive_group_norm_triton(...)`` the custom-op path, whatever the device.

Design (the "why"s)
-------------------
* Folding. Per (b, c) the whole modulation chain is affine in x̂, so the kernel folds it into
  ``a = γ(1+s)(1+s_z)`` and ``bb = (1+s_z)(β(1+s) + b) + b_z`` and writes ``act(a·x̂ + bb)``: x is read
  once and y written once (plus, for groups too large for registers, a second read of x that is
  served from L2, see below). The [B, C] modulations are read inside the kernel through their own
  strides, so the strided views ``torch.chunk(emb_out, 2, 1)`` produces cost no copy and no extra
  launch.
* Statistics in fp32 (fp64 for fp64 inputs, so gradcheck is meaningful), numerically robust.
  ``E[x²] − E[x]²`` is useless for activations sitting on a large offset, and even a plain fp32
  mean loses ~u·|mean|/σ of x̂ (1 % at 1e4 ± 0.1). The kernel instead pivots on K = the group's
  first element: ``x − K`` is exact in fp32 for data near K (Sterbenz), statistics are accumulated on
  ``x − K`` per tile with an in-register two-pass (tile mean, then centred sum of squares) and the
  tiles are merged with Chan's parallel formula. The saved statistics are (K, δ = mean − K, rstd)
  and x̂ is always formed as ``((x − K) − δ)·rstd``; the fold is then ``(x − K)·(a·rstd) + (bb − δ·a·rstd)``,
  never ``x·A + B`` (which would cancel catastrophically on a large offset). Cost: one subtract
  per element in a memory-bound kernel.
* Launch grid: one program per (sample, block of GPB neighbouring groups), tiles [GPB, channels,
  positions]. At the celeba64 training shapes (B = 64, 32 groups) the 32²/64² levels run GPB = 1,
  i.e. 2048 programs, enough to fill an H200, so no cross-program split of a group is needed (a
  split would force a second HBM read of x or a second launch); the small groups of the 8²/16²
  levels are batched 2 per program as long as >= 4 programs per SM remain. Groups (blocks) that
  fit a register tile (``_SINGLE_MAX_*`` elements) are loaded once and kept in registers; larger
  ones are walked in tiles twice (statistics, then output). With ~2 programs per SM resident, the
  working set of the second walk (a few MB) stays in the 50+ MB L2, so HBM traffic stays ~1 read
  + 1 write. channels_last has its own choice of GPB (see Layouts). Under the interpreter, whose
  cost is per program and per op rather than per element, all groups of a sample go in one program
  (``_plan``): same kernel, different constexprs; ``_INTERP_PLAN = False`` plans interpreted
  launches as on a GPU with ``_CPU_SM_COUNT`` SMs (tests).
* Host side: plans are cached per (shape, layout, dtype, device, knobs); eager calls run the ops
  through an ``autograd.Function`` twin of the custom op (same launches), whose dispatch costs
  less host time than custom_op's; torch.compile traces the custom op.
* Backward recomputes x̂ from x and the saved [B, G] statistics rather than storing x̂: storing it
  would cost a full-size write in forward and a full-size read in backward, recomputing costs a
  few FLOPs per element of a memory-bound kernel that reads x anyway.
* Determinism: no atomics anywhere. Each program owns its groups' channels and writes per-(b, c)
  results: the modulation gradients directly ([B, C], in their own dtype) and per-sample partials
  of d weight / d bias ([B, C], fp32) that are then summed over the batch with ``torch.sum``
  (a deterministic reduction, B·C elements: negligible). Runs are bitwise reproducible.
* Layouts. The kernel addresses x as ``b·sb + c·sc + s·ss`` where the trailing dims collapse to one
  strided axis ``s``: contiguous NCHW (ss = 1) and channels_last (sc = 1) both run with no copy;
  Triton specialises a stride equal to 1, so the unit-stride axis gets vectorised accesses in either
  layout. In channels_last a pixel row holds all C channels, and a group only Cg of them (2-32
  elements at the UNet's widths); two things keep that from costing bandwidth:

  - the group width is a compile-time constant there (``CG``), so the compiler knows each group's
    run of channels is contiguous and aligned and issues 4-16-byte vector accesses (as a runtime
    value not divisible by 16 it got 2-byte scalar ones: ``ptxas`` output for sm_90);
  - its launch plan puts several neighbouring groups in one program (``_cl_gpb``), whose channels
    are adjacent in every row, so a program uses whole 32-byte sectors instead of a few bytes of
    each, the rest of which other programs would fetch again through L2. The width is chosen
    against the program count and the L2 working set of the two-walk path (see ``_cl_gpb``).

  A tensor whose trailing dims do not collapse (an odd permutation or slice) is made contiguous
  first (a documented copy).
* Autocast: the op is deliberately not autocast-registered (custom ops fall through autocast).
  Inputs are taken in the dtypes given, math and statistics run in fp32, and the output has x's
  dtype. Under bf16 autocast x arrives in bf16 (it is a conv output), so the op reads and writes
  bf16, half the traffic of the fp32 that autocast's GroupNorm policy would produce. The
  reference composite also returns x's dtype so both backends agree.
* Gradients only for what needs them: the backward passes a bit mask from ``ctx.needs_input_grad``
  so a frozen trunk (weight/bias without grad) or a non-differentiable x skips those stores.
"""
import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, next_pow2, use_triton

__all__ = ["adaptive_group_norm", "adaptive_group_norm_ref", "adaptive_group_norm_triton"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# reference composite
# ---------------------------------------------------------------------------------------------
def adaptive_group_norm_ref(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                            shift: Optional[torch.Tensor] = None, z_scale: Optional[torch.Tensor] = None,
                            z_shift: Optional[torch.Tensor] = None, eps: float = 1e-5,
                            act: Optional[str] = "silu") -> torch.Tensor:
    """Eager composite in the original's op order: (1+s_z)·(GN(x)·(1+s) + b) + b_z, then SiLU."""
    _validate(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)
    expand = (...,) + (None,) * (x.ndim - 2)

    def bc(t):  # [B, C] (or [B, C, 1, ...]) -> broadcastable over the spatial dims
        return t.reshape(t.shape[0], t.shape[1])[expand]

    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        h = h * (1.0 + bc(scale))
    if shift is not None:
        h = h + bc(shift)
    if z_scale is not None:
        h = (1.0 + bc(z_scale)) * h
    if z_shift is not None:
        h = h + bc(z_shift)
    if act == "silu":
        h = F.silu(h)
    return h.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# validation (runs before any launch, on both backends)
# ---------------------------------------------------------------------------------------------
def _validate(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"adaptive_group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(f"adaptive_group_norm: x must have ndim >= 3 ([B, C, *spatial]), got shape "
                         f"{tuple(x.shape)} (ndim={x.ndim})")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"adaptive_group_norm: x has dtype {x.dtype}; expected one of float32, "
                         f"bfloat16, float16, float64")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"adaptive_group_norm: num_groups must be a positive int, got {num_groups!r}")
    B, C = x.shape[0], x.shape[1]
    if C % num_groups != 0:
        raise ValueError(f"adaptive_group_norm: channels C={C} are not divisible by num_groups={num_groups}")
    if act not in ("silu", None):
        raise ValueError(f"adaptive_group_norm: act must be 'silu' or None, got {act!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"adaptive_group_norm: eps must be a float >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(name, t, x)
        if tuple(t.shape) != (C,):
            raise ValueError(f"adaptive_group_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift), ("z_scale", z_scale), ("z_shift", z_shift)):
        if t is None:
            continue
        _check_tensor(name, t, x)
        shape = tuple(t.shape)
        # [B, C], or the original's [B, C, 1, ..., 1] with x's ndim (emb_out[..., None, None]).
        ok = shape == (B, C) or (len(shape) == x.ndim and shape[:2] == (B, C)
                                 and all(s == 1 for s in shape[2:]))
        if not ok:
            raise ValueError(f"adaptive_group_norm: {name} must have shape ({B}, {C}) (one value per "
                             f"sample and channel), got {shape}")


def _check_tensor(name, t, x):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"adaptive_group_norm: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"adaptive_group_norm: {name} has dtype {t.dtype}; expected a floating dtype")
    if t.device != x.device:
        raise ValueError(f"adaptive_group_norm: {name} is on {t.device} but x is on {x.device}")


def _as_bc(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, C, 1, ...] -> [B, C] view (no copy; keeps the chunk view's strides)."""
    if t is None or t.ndim == 2:
        return t
    return t.reshape(t.shape[0], t.shape[1])


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def adaptive_group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                        shift: Optional[torch.Tensor] = None, z_scale: Optional[torch.Tensor] = None,
                        z_shift: Optional[torch.Tensor] = None, eps: float = 1e-5,
                        act: Optional[str] = "silu", *, backend: str = "auto") -> torch.Tensor:
    """act((1+z_scale)·((GN(x)·weight+bias)·(1+scale)+shift)+z_shift); output in x's dtype.

    ``backend``: "auto" (Triton when x is on CUDA or TRITON_INTERPRET=1, else the reference),
    "triton" (force the fused op; fails without triton) or "ref" (force the eager composite).
    """
    if backend == "ref":
        return adaptive_group_norm_ref(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)
    if backend == "auto":
        if not (isinstance(x, torch.Tensor) and use_triton(x)):
            return adaptive_group_norm_ref(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)
    elif backend != "triton":
        raise ValueError(f"adaptive_group_norm: backend must be 'auto', 'triton' or 'ref', got {backend!r}")
    return adaptive_group_norm_triton(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)


def adaptive_group_norm_triton(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                               z_scale=None, z_shift=None, eps=1e-5, act="silu"):
    """The fused custom op, whatever the device (CPU only works under TRITON_INTERPRET=1)."""
    _validate(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)
    if not HAS_TRITON:
        raise RuntimeError("adaptive_group_norm: backend='triton' requested but triton is not installed")
    if x.numel() == 0:  # nothing to launch; the composite defines the (empty) result
        return adaptive_group_norm_ref(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, act)
    y, _ = _fwd_apply(x, num_groups, weight, bias, _as_bc(scale), _as_bc(shift), _as_bc(z_scale),
                      _as_bc(z_shift), float(eps), act == "silu")
    return y


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# Tiles are 3-D, [GPB groups, BLOCK_C channels, BLOCK_S positions]: one program normalises GPB
# neighbouring groups of one sample. In NCHW, GPB = 1 for the large groups of the 32²/64² levels;
# small groups (8², 16²) are batched a few per program so each program still moves a few thousand
# elements. In channels_last GPB is sized for whole sectors of each pixel row (``_cl_gpb``); there
# channel c of group g sits at (g·Cg + c)·sc with sc = 1, so the GPB groups' channels form one run.
# Under the interpreter, whose cost is per program and per op rather than per element, all groups
# of a sample go in one program.
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chan_params(W, BIAS, S, SH, SZ, SHZ, b, c, mc, ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                     MODS, GPB: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        """γ, β, p = 1+s, shift, q = 1+s_z, shift_z for the [GPB, BLOCK_C] channels c of sample b.

        A missing tensor (bit clear in MODS: 1 weight, 2 bias, 4 scale, 8 shift, 16 z_scale,
        32 z_shift) takes its identity value, so one code path serves all 64 combinations. MODS is
        a runtime argument, not a constexpr: the branches are uniform and run once per channel
        tile, so they cost nothing next to the per-element work, while 64 constexpr
        specialisations (x 2 for backward) would each be a separate JIT compile. (Loads are
        written out inline: nested @jit calls are expensive under the interpreter.)
        """
        if (MODS & 1) != 0:
            gam = tl.load(W + c, mask=mc, other=1.0).to(ACC)
        else:
            gam = tl.full([GPB, BLOCK_C], 1.0, ACC)
        if (MODS & 2) != 0:
            bet = tl.load(BIAS + c, mask=mc, other=0.0).to(ACC)
        else:
            bet = tl.full([GPB, BLOCK_C], 0.0, ACC)
        if (MODS & 4) != 0:
            p = 1.0 + tl.load(S + (b * ssb + c * ssc), mask=mc, other=0.0).to(ACC)
        else:
            p = tl.full([GPB, BLOCK_C], 1.0, ACC)
        if (MODS & 8) != 0:
            sh = tl.load(SH + (b * sshb + c * sshc), mask=mc, other=0.0).to(ACC)
        else:
            sh = tl.full([GPB, BLOCK_C], 0.0, ACC)
        if (MODS & 16) != 0:
            q = 1.0 + tl.load(SZ + (b * szb + c * szc), mask=mc, other=0.0).to(ACC)
        else:
            q = tl.full([GPB, BLOCK_C], 1.0, ACC)
        if (MODS & 32) != 0:
            shz = tl.load(SHZ + (b * szhb + c * szhc), mask=mc, other=0.0).to(ACC)
        else:
            shz = tl.full([GPB, BLOCK_C], 0.0, ACC)
        return gam, bet, p, sh, q, shz

    # The [B, C] tables' strides and the presence bits are not specialised on: a specialisation
    # (stride == 1, divisible by 16, ...) buys nothing for a few per-channel loads, and the strides
    # of absent tables (0) vs present chunk views (2C, 1) would otherwise multiply JIT compiles.
    _NO_SPEC = ["ssb", "ssc", "sshb", "sshc", "szb", "szc", "szhb", "szhc", "MODS", "NEEDS"]

    @triton.jit(do_not_specialize=_NO_SPEC[:-1])
    def _agn_fwd_kernel(
        X, Y, STATS, W, BIAS, S, SH, SZ, SHZ,
        G, NGB, Cg, HW, eps,
        sxb, sxc, sxs, syb, syc, sys_,
        ssb, ssc, sshb, sshc, szb, szc, szhb, szhc, MODS,
        SILU: tl.constexpr, SINGLE: tl.constexpr,
        GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
        CG: tl.constexpr,
    ):
        if CG != 0:  # channels_last: the group width as a constant (vector loads, see _launch_fwd)
            Cg = CG
        pid = tl.program_id(0)          # group blocks fastest: neighbouring groups run together
        b = pid // NGB
        g0 = (pid % NGB) * GPB
        offs_g = tl.arange(0, GPB)
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        mg = g0 + offs_g < G                                  # [GPB] real groups
        ch0 = (g0 + offs_g) * Cg                              # [GPB] first channel of each group
        # 1/n computed in ACC (a float argument would be fp32 even for fp64 inputs); written as a
        # [GPB] vector so it also works when Triton specialises Cg or HW == 1 into a constexpr.
        inv_n = 1.0 / (tl.zeros([GPB], ACC) + Cg * HW)
        xb = X + b.to(tl.int64) * sxb
        yb = Y + b.to(tl.int64) * syb
        # Pivot K: each group's first element (exact in ACC); see the module docstring.
        K = tl.load(xb + ch0 * sxc, mask=mg, other=0.0).to(ACC)

        if SINGLE:
            mc = mg[:, None] & (offs_c < Cg)[None, :]
            cidx = ch0[:, None] + offs_c[None, :]
            m = mc[:, :, None] & (offs_s < HW)[None, None, :]
            x = tl.load(xb + cidx[:, :, None] * sxc + offs_s[None, None, :] * sxs, mask=m, other=0.0).to(ACC)
            d = tl.where(m, x - K[:, None, None], 0.0)
            delta = tl.sum(tl.sum(d, axis=2), axis=1) * inv_n            # mean − K, [GPB]
            e = tl.where(m, d - delta[:, None, None], 0.0)                # x − mean, no cancellation
            var = tl.sum(tl.sum(e * e, axis=2), axis=1) * inv_n
            rstd = 1.0 / tl.sqrt(var + eps)
            gam, bet, p, sh, q, shz = _chan_params(W, BIAS, S, SH, SZ, SHZ, b, cidx, mc,
                                                   ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                                                   MODS,
                                                   GPB, BLOCK_C, ACC)
            sc = gam * p * q * rstd[:, None]
            bb = q * (bet * p + sh) + shz
            u = e * sc[:, :, None] + bb[:, :, None]
            if SILU:
                u = u / (1.0 + tl.exp(-u))
            tl.store(yb + cidx[:, :, None] * syc + offs_s[None, None, :] * sys_, u.to(Y.dtype.element_ty), mask=m)
        else:
            # Walk 1: per-tile two-pass moments of (x − K), merged with Chan's formula.
            cnt = tl.zeros([GPB], ACC)
            delta = tl.zeros([GPB], ACC)
            m2 = tl.zeros([GPB], ACC)
            for c0 in range(0, Cg, BLOCK_C):
                cc = c0 + offs_c
                mc = mg[:, None] & (cc < Cg)[None, :]
                cidx = ch0[:, None] + cc[None, :]
                nc = tl.minimum(Cg - c0, BLOCK_C)
                for s0 in range(0, HW, BLOCK_S):
                    ss = s0 + offs_s
                    m = mc[:, :, None] & (ss < HW)[None, None, :]
                    x = tl.load(xb + cidx[:, :, None] * sxc + ss[None, None, :] * sxs, mask=m, other=0.0).to(ACC)
                    d = tl.where(m, x - K[:, None, None], 0.0)
                    nt = (nc * tl.minimum(HW - s0, BLOCK_S)).to(ACC)
                    tmean = tl.sum(tl.sum(d, axis=2), axis=1) / nt
                    e = tl.where(m, d - tmean[:, None, None], 0.0)
                    tm2 = tl.sum(tl.sum(e * e, axis=2), axis=1)
                    tot = cnt + nt
                    dm = tmean - delta
                    delta = delta + dm * (nt / tot)
                    m2 = m2 + tm2 + dm * dm * (cnt * (nt / tot))
                    cnt = tot
            var = m2 * inv_n
            rstd = 1.0 / tl.sqrt(var + eps)
            # Walk 2: y = (x − K)·(a·rstd) + (bb − δ·a·rstd); this re-read is L2-resident.
            for c0 in range(0, Cg, BLOCK_C):
                cc = c0 + offs_c
                mc = mg[:, None] & (cc < Cg)[None, :]
                cidx = ch0[:, None] + cc[None, :]
                gam, bet, p, sh, q, shz = _chan_params(W, BIAS, S, SH, SZ, SHZ, b, cidx, mc,
                                                       ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                                                       MODS,
                                                       GPB, BLOCK_C, ACC)
                sc = gam * p * q * rstd[:, None]
                sb = q * (bet * p + sh) + shz - delta[:, None] * sc
                for s0 in range(0, HW, BLOCK_S):
                    ss = s0 + offs_s
                    m = mc[:, :, None] & (ss < HW)[None, None, :]
                    x = tl.load(xb + cidx[:, :, None] * sxc + ss[None, None, :] * sxs, mask=m, other=0.0).to(ACC)
                    u = (x - K[:, None, None]) * sc[:, :, None] + sb[:, :, None]
                    if SILU:
                        u = u / (1.0 + tl.exp(-u))
                    tl.store(yb + cidx[:, :, None] * syc + ss[None, None, :] * sys_,
                             u.to(Y.dtype.element_ty), mask=m)

        st = STATS + (b * G + g0 + offs_g) * 3
        tl.store(st + 0, K, mask=mg)
        tl.store(st + 1, delta, mask=mg)
        tl.store(st + 2, rstd, mask=mg)

    @triton.jit
    def _store_chan_grads(dA, dB, gam, bet, p, sh, q, b, c, mc, C,
                          DWP, DBP, DS, DSH, DSZ, DSHZ,
                          NEEDS):
        # Chain rule from dA = ∂L/∂a, dB = ∂L/∂bb (per sample and channel) through
        # a = γ·p·q, bb = q·(β·p + sh) + shz with p = 1+s, q = 1+s_z. All outputs are [B, C]
        # contiguous and each (b, c) is owned by one program: plain stores, no atomics. NEEDS bits
        # (runtime, like MODS): 1 weight, 2 bias, 4 scale, 8 shift, 16 z_scale, 32 z_shift.
        off = b * C + c
        if (NEEDS & 1) != 0:
            tl.store(DWP + off, (dA * p * q).to(DWP.dtype.element_ty), mask=mc)
        if (NEEDS & 2) != 0:
            tl.store(DBP + off, (dB * p * q).to(DBP.dtype.element_ty), mask=mc)
        if (NEEDS & 4) != 0:
            tl.store(DS + off, (q * (dA * gam + dB * bet)).to(DS.dtype.element_ty), mask=mc)
        if (NEEDS & 8) != 0:
            tl.store(DSH + off, (dB * q).to(DSH.dtype.element_ty), mask=mc)
        if (NEEDS & 16) != 0:
            tl.store(DSZ + off, (dA * gam * p + dB * (bet * p + sh)).to(DSZ.dtype.element_ty), mask=mc)
        if (NEEDS & 32) != 0:
            tl.store(DSHZ + off, dB.to(DSHZ.dtype.element_ty), mask=mc)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _agn_bwd_kernel(
        DY, X, STATS, W, BIAS, S, SH, SZ, SHZ,
        DX, DWP, DBP, DS, DSH, DSZ, DSHZ,
        G, NGB, C, Cg, HW,
        sdyb, sdyc, sdys, sxb, sxc, sxs, sdxb, sdxc, sdxs,
        ssb, ssc, sshb, sshc, szb, szc, szhb, szhc, MODS, NEEDS,
        SILU: tl.constexpr, NEED_DX: tl.constexpr,
        SINGLE: tl.constexpr, GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        ACC: tl.constexpr, CG: tl.constexpr,
    ):
        if CG != 0:  # channels_last: the group width as a constant (vector loads, see _launch_fwd)
            Cg = CG
        # Per group: du = dy·act'(u); dA_c = Σ_s du·x̂, dB_c = Σ_s du; then the GroupNorm backward
        # with per-channel gain a_c: dx = rstd·(a_c·du − (Σ_c a_c dB_c + x̂·Σ_c a_c dA_c)/n).
        pid = tl.program_id(0)
        b = pid // NGB
        g0 = (pid % NGB) * GPB
        offs_g = tl.arange(0, GPB)
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        mg = g0 + offs_g < G
        ch0 = (g0 + offs_g) * Cg
        inv_n = 1.0 / (tl.zeros([GPB], ACC) + Cg * HW)
        b64 = b.to(tl.int64)
        xb = X + b64 * sxb
        dyb = DY + b64 * sdyb
        dxb = DX + b64 * sdxb
        st = STATS + (b * G + g0 + offs_g) * 3
        K = tl.load(st + 0, mask=mg, other=0.0).to(ACC)[:, None, None]
        delta = tl.load(st + 1, mask=mg, other=0.0).to(ACC)[:, None, None]
        rstd = tl.load(st + 2, mask=mg, other=0.0).to(ACC)[:, None, None]

        if SINGLE:
            mc = mg[:, None] & (offs_c < Cg)[None, :]
            cidx = ch0[:, None] + offs_c[None, :]
            m = mc[:, :, None] & (offs_s < HW)[None, None, :]
            x = tl.load(xb + cidx[:, :, None] * sxc + offs_s[None, None, :] * sxs, mask=m, other=0.0).to(ACC)
            dy = tl.load(dyb + cidx[:, :, None] * sdyc + offs_s[None, None, :] * sdys, mask=m, other=0.0).to(ACC)
            xhat = tl.where(m, ((x - K) - delta) * rstd, 0.0)
            gam, bet, p, sh, q, shz = _chan_params(W, BIAS, S, SH, SZ, SHZ, b, cidx, mc,
                                                   ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                                                   MODS,
                                                   GPB, BLOCK_C, ACC)
            a = gam * p * q
            if SILU:
                u = xhat * a[:, :, None] + (q * (bet * p + sh) + shz)[:, :, None]
                sig = 1.0 / (1.0 + tl.exp(-u))
                du = dy * (sig * (1.0 + u * (1.0 - sig)))
            else:
                du = dy
            du = tl.where(m, du, 0.0)
            dA = tl.sum(du * xhat, axis=2)
            dB = tl.sum(du, axis=2)
            _store_chan_grads(dA, dB, gam, bet, p, sh, q, b, cidx, mc, C,
                              DWP, DBP, DS, DSH, DSZ, DSHZ,
                              NEEDS)
            if NEED_DX:
                k1 = (tl.sum(a * dB, axis=1) * inv_n)[:, None, None]
                k2 = (tl.sum(a * dA, axis=1) * inv_n)[:, None, None]
                dx = rstd * (du * a[:, :, None] - (k1 + xhat * k2))
                tl.store(dxb + cidx[:, :, None] * sdxc + offs_s[None, None, :] * sdxs,
                         dx.to(DX.dtype.element_ty), mask=m)
        else:
            k1 = tl.zeros([GPB], ACC)
            k2 = tl.zeros([GPB], ACC)
            for c0 in range(0, Cg, BLOCK_C):
                cc = c0 + offs_c
                mc = mg[:, None] & (cc < Cg)[None, :]
                cidx = ch0[:, None] + cc[None, :]
                gam, bet, p, sh, q, shz = _chan_params(W, BIAS, S, SH, SZ, SHZ, b, cidx, mc,
                                                       ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                                                       MODS,
                                                       GPB, BLOCK_C, ACC)
                a = gam * p * q
                bb = q * (bet * p + sh) + shz
                dA = tl.zeros([GPB, BLOCK_C], ACC)
                dB = tl.zeros([GPB, BLOCK_C], ACC)
                for s0 in range(0, HW, BLOCK_S):
                    ss = s0 + offs_s
                    m = mc[:, :, None] & (ss < HW)[None, None, :]
                    x = tl.load(xb + cidx[:, :, None] * sxc + ss[None, None, :] * sxs, mask=m, other=0.0).to(ACC)
                    dy = tl.load(dyb + cidx[:, :, None] * sdyc + ss[None, None, :] * sdys, mask=m,
                                 other=0.0).to(ACC)
                    xhat = tl.where(m, ((x - K) - delta) * rstd, 0.0)
                    if SILU:
                        u = xhat * a[:, :, None] + bb[:, :, None]
                        sig = 1.0 / (1.0 + tl.exp(-u))
                        du = dy * (sig * (1.0 + u * (1.0 - sig)))
                    else:
                        du = dy
                    du = tl.where(m, du, 0.0)
                    dA += tl.sum(du * xhat, axis=2)
                    dB += tl.sum(du, axis=2)
                _store_chan_grads(dA, dB, gam, bet, p, sh, q, b, cidx, mc, C,
                                  DWP, DBP, DS, DSH, DSZ, DSHZ,
                                  NEEDS)
                k1 += tl.sum(a * dB, axis=1)
                k2 += tl.sum(a * dA, axis=1)
            if NEED_DX:
                k1 = (k1 * inv_n)[:, None, None]
                k2 = (k2 * inv_n)[:, None, None]
                for c0 in range(0, Cg, BLOCK_C):
                    cc = c0 + offs_c
                    mc = mg[:, None] & (cc < Cg)[None, :]
                    cidx = ch0[:, None] + cc[None, :]
                    gam, bet, p, sh, q, shz = _chan_params(W, BIAS, S, SH, SZ, SHZ, b, cidx, mc,
                                                           ssb, ssc, sshb, sshc, szb, szc, szhb, szhc,
                                                           MODS,
                                                           GPB, BLOCK_C, ACC)
                    a = gam * p * q
                    bb = q * (bet * p + sh) + shz
                    for s0 in range(0, HW, BLOCK_S):
                        ss = s0 + offs_s
                        m = mc[:, :, None] & (ss < HW)[None, None, :]
                        x = tl.load(xb + cidx[:, :, None] * sxc + ss[None, None, :] * sxs, mask=m,
                                    other=0.0).to(ACC)
                        dy = tl.load(dyb + cidx[:, :, None] * sdyc + ss[None, None, :] * sdys, mask=m,
                                     other=0.0).to(ACC)
                        xhat = ((x - K) - delta) * rstd
                        if SILU:
                            u = xhat * a[:, :, None] + bb[:, :, None]
                            sig = 1.0 / (1.0 + tl.exp(-u))
                            du = dy * (sig * (1.0 + u * (1.0 - sig)))
                        else:
                            du = dy
                        dx = rstd * (du * a[:, :, None] - (k1 + xhat * k2))
                        tl.store(dxb + cidx[:, :, None] * sdxc + ss[None, None, :] * sdxs,
                                 dx.to(DX.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# launch planning
# ---------------------------------------------------------------------------------------------
# Knobs (elements per register tile). Module-level so tests can force every code path on tiny
# shapes and a GPU tuning script can sweep them. The GPU values are untuned first guesses for
# H100/H200 (no GPU was available when this was written): the forward keeps ~2 live fp32 values
# per element, the backward ~4, hence the smaller single-tile limit there.
_SINGLE_MAX_FWD = 16384     # a group (block) up to this size is loaded once and kept in registers
_SINGLE_MAX_BWD = 8192
_TILE = 4096                # tile of the two-walk path for larger groups
_MAX_BLOCK_C = 64           # channels per tile (more channels per group are looped over)
_GPU_GROUP_BLOCK = 4096     # batch small groups into one program up to this many elements ...
_GPU_WAVES = 4              # ... while keeping >= this many programs per SM
_CL_ROW_BYTES = 64          # channels_last: a program's channels span >= this many bytes of a pixel row ...
_CL_MIN_WAVES = 1           # ... unless that leaves fewer than this many programs per SM
_CL_L2_BYTES = 24 << 20     # ... or a two-walk re-read working set beyond this (about half an H100's L2)
_ELEMS_PER_THREAD = 16      # num_warps = tile / (32 · this), clamped to [1, 16]
_INTERP_TILE = 1 << 18      # interpreter: as many groups per program as fit this many elements
_GPB: Optional[int] = None  # force groups per program (tests)
_INTERP_PLAN = True         # False: plan CPU (interpreter) launches as on a GPU (tests)
_CPU_SM_COUNT = 132         # the SM count a CPU launch planned as on a GPU assumes (an H100 SXM)

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


class Plan(NamedTuple):
    gpb: int            # groups per program (a power of two; the last block is masked when it does not divide G)
    block_c: int        # channels per tile row
    block_s: int        # positions per tile
    single: bool        # whole block in registers (one read) vs two walks over tiles
    num_warps: int
    ngb: int            # group blocks per sample: the grid is B · ngb programs


def _plan(x: torch.Tensor, G: int, Cg: int, HW: int, bwd: bool, channels_last: bool = False) -> Plan:
    """The launch plan for x; ``channels_last``: the kernel reads x with channel stride 1."""
    interp = not x.is_cuda and _INTERP_PLAN
    sms = 0 if interp else (_sm_count(x.device) if x.is_cuda else _CPU_SM_COUNT)
    # Everything the plan depends on, the knobs included (tests and tuning sweeps change them).
    return _plan_cached(x.shape[0], G, Cg, HW, bwd, channels_last and HW > 1, x.element_size(), sms,
                        interp, _SINGLE_MAX_FWD, _SINGLE_MAX_BWD, _TILE, _MAX_BLOCK_C, _GPU_GROUP_BLOCK,
                        _GPU_WAVES, _CL_ROW_BYTES, _CL_MIN_WAVES, _CL_L2_BYTES, _ELEMS_PER_THREAD, _INTERP_TILE, _GPB)


def launch_plan(B: int, G: int, Cg: int, HW: int, *, bwd: bool, channels_last: bool, elem_size: int,
                sm_count: int) -> Plan:
    """The GPU launch plan for an x of B samples, G groups of Cg channels and HW positions (with
    the module's current knobs), for a device with ``sm_count`` SMs; no tensor needed."""
    return _plan_cached(B, G, Cg, HW, bwd, channels_last and HW > 1, elem_size, sm_count, False,
                        _SINGLE_MAX_FWD, _SINGLE_MAX_BWD, _TILE, _MAX_BLOCK_C, _GPU_GROUP_BLOCK,
                        _GPU_WAVES, _CL_ROW_BYTES, _CL_MIN_WAVES, _CL_L2_BYTES, _ELEMS_PER_THREAD, _INTERP_TILE, _GPB)


@functools.lru_cache(maxsize=4096)
def _plan_cached(B, G, Cg, HW, bwd, channels_last, elem_size, sms, interp, single_max_fwd,
                 single_max_bwd, tile, max_block_c, group_block, waves, cl_row_bytes, cl_min_waves,
                 cl_l2_bytes, elems_per_thread, interp_tile, force_gpb) -> Plan:
    # A pure function of integers, cached: a training step plans the same few dozen launches every
    # step, and the plan is the same each time.
    pc, ps, pg = next_pow2(Cg), next_pow2(HW), next_pow2(G)
    group = pc * ps
    single_max = interp_tile if (interp and force_gpb is None) else (single_max_bwd if bwd else single_max_fwd)
    if pc > max_block_c:
        single_max = 0
    if force_gpb is not None:
        gpb = min(next_pow2(force_gpb), pg)
    elif interp:
        # The interpreter pays per program and per op, not per element: fewest programs.
        gpb = 1
        while gpb < pg and 2 * gpb * group <= interp_tile:
            gpb *= 2
    else:
        gpb = 1
        if channels_last:
            gpb = _cl_gpb(B, G, Cg, HW, elem_size, sms, group, pg, single_max, cl_row_bytes, cl_min_waves,
                          cl_l2_bytes)
        min_programs = waves * sms
        while (gpb < pg and 2 * gpb * group <= group_block
               and B * _cdiv(G, 2 * gpb) >= min_programs):
            gpb *= 2
    if pc <= max_block_c and gpb * group <= single_max:
        bc, bs, single = pc, ps, True
    else:
        # A wider channel block takes fewer positions per tile: the tile, and with it the
        # registers per thread, stays at `tile` elements.
        bc = min(pc, max_block_c)
        bs = min(ps, max(1, tile // (bc * gpb)))
        single = False
    # ~16 elements per thread in a tile: enough independent loads in flight per thread while
    # keeping the backward's live fp32 values out of spill territory (ptxas for sm_90 reports
    # 40-200 registers and no spills at the celeba64 shapes, the 8² channels_last backward being
    # the heaviest).
    num_warps = max(1, min(16, (gpb * bc * bs) // (32 * elems_per_thread)))
    return Plan(gpb, bc, bs, single, num_warps, _cdiv(G, gpb))


def _cl_gpb(B, G, Cg, HW, elem_size, sms, group, pg, single_max, row_bytes, min_waves, l2_bytes) -> int:
    """Groups per program for channels_last (channel stride 1).

    A pixel row of x holds all C channels side by side and a program reads GPB·Cg of them per row
    (its groups' channels are adjacent). One group's Cg channels are only 2-64 bytes at the UNet's
    channel counts, a fraction of a 32-byte sector (the unit L2 serves), so with GPB = 1 each
    program pulls whole sectors from L2 to use a few bytes of each: up to 8x the useful traffic
    between L2 and the SMs, which then bounds the kernel well below HBM bandwidth. Candidates are
    GPB = 1, 2, 4, ... up to the first that spans ``row_bytes`` per row, stopping before one that
    would

    * leave fewer than ``min_waves`` programs per SM (idle SMs cost more than partial sectors; at
      the small batches where this binds, x is a few MB and stays in L2 between the programs that
      share its sectors), or
    * outgrow the register tile and take the two-walk path with a re-read working set beyond
      ``l2_bytes``: the second walk re-reads the block from L2 only while the blocks of all
      resident programs (~2 per SM) fit there; past that it re-reads from HBM.

    Among them the plan takes the least L2 traffic per useful byte, walks × (sectors touched per
    row / bytes used per row): a block that leaves the register tile reads x twice (statistics,
    then output), which undoes the gain of one doubling, so 32 bytes in registers beat 64 bytes in
    two walks. Ties go to fewer walks, then to the wider block.
    """
    def cost(g):
        run = g * Cg * elem_size
        walks = 1 if g * group <= single_max else 2
        return walks * (_cdiv(run, 32) * 32) / run, walks, -g

    cands = [1]
    while cands[-1] < pg and cands[-1] * Cg * elem_size < row_bytes:
        nxt = 2 * cands[-1]
        programs = B * _cdiv(G, nxt)
        if programs < min_waves * sms:
            break
        if nxt * group > single_max and min(programs, 2 * sms) * nxt * Cg * HW * elem_size > l2_bytes:
            break
        cands.append(nxt)
    return min(cands, key=cost)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bcs_strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_s) if the trailing dims of t collapse into one strided axis."""
    return _collapse(t.shape, t.stride())


@functools.lru_cache(maxsize=1024)
def _collapse(shape, stride):
    dims = [(n, s) for n, s in zip(shape[2:], stride[2:]) if n != 1]
    for (_, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return stride[0], stride[1], (dims[-1][1] if dims else 1)


def _readable(t: torch.Tensor):
    """t (or a contiguous copy, for layouts the kernel cannot address) and its strides."""
    st = _bcs_strides(t)
    if st is None:
        t = t.contiguous()
        st = _bcs_strides(t)
    return t, st


def _writable(out: torch.Tensor, like: torch.Tensor, like_strides):
    """out (or a fresh contiguous buffer when its layout does not collapse) and its strides;
    ``like``'s strides are reused when out has the same layout (the usual case: no re-derivation)."""
    if out.stride() == like.stride():
        return out, like_strides
    st = _bcs_strides(out)
    if st is None:
        out = torch.empty(out.shape, device=out.device, dtype=out.dtype)
        st = _bcs_strides(out)
    return out, st


def _mod_strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _bits(*present) -> int:
    """Bit i set <=> the i-th item is present (a tensor, or True)."""
    return sum(1 << i for i, t in enumerate(present) if t is not None and t is not False)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_fwd(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, silu):
    B, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    Cg = C // num_groups
    y = torch.empty_like(x)
    stats = torch.empty((B, num_groups, 3), device=x.device, dtype=_stat_dtype(x.dtype))
    xr, (sxb, sxc, sxs) = _readable(x)
    yw, (syb, syc, sys_) = _writable(y, xr, (sxb, sxc, sxs))
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    dummy = stats  # stands in for absent pointers; never dereferenced (constexpr-pruned)
    gpb, bc, bs, single, nw, ngb = _plan(x, num_groups, Cg, HW, False, sxc == 1)
    _agn_fwd_kernel[(B * ngb,)](
        xr, yw, stats,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        z_scale if z_scale is not None else dummy, z_shift if z_shift is not None else dummy,
        num_groups, ngb, Cg, HW, eps,
        sxb, sxc, sxs, syb, syc, sys_,
        *_mod_strides(scale), *_mod_strides(shift), *_mod_strides(z_scale), *_mod_strides(z_shift),
        _bits(weight, bias, scale, shift, z_scale, z_shift),
        SILU=silu, SINGLE=single, GPB=gpb, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(x.dtype), CG=Cg if sxc == 1 else 0,
        num_warps=nw,
    )
    if yw is not y:
        y.copy_(yw)
    return y, stats


# bit i of `needs` <=> gradient i of (x, weight, bias, scale, shift, z_scale, z_shift) is wanted
_GRAD_NAMES = ("x", "weight", "bias", "scale", "shift", "z_scale", "z_shift")


def _bwd_outputs(x, stats, weight, bias, scale, shift, z_scale, z_shift, needs):
    """Allocations of the backward op (shared by the real and the fake implementation)."""
    B, C = x.shape[0], x.shape[1]
    empty = lambda: x.new_empty((0,))  # noqa: E731 - placeholder for a gradient not asked for
    dx = torch.empty_like(x) if needs & 1 else empty()
    dwp = x.new_empty((B, C), dtype=stats.dtype) if needs & 2 else empty()
    dbp = x.new_empty((B, C), dtype=stats.dtype) if needs & 4 else empty()
    mods = []
    for i, t in enumerate((scale, shift, z_scale, z_shift)):
        mods.append(x.new_empty((B, C), dtype=t.dtype) if (needs >> (3 + i)) & 1 and t is not None
                    else empty())
    return (dx, dwp, dbp, *mods)


def _launch_bwd(dy, x, stats, weight, bias, scale, shift, z_scale, z_shift, num_groups, silu, needs):
    B, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    Cg = C // num_groups
    outs = _bwd_outputs(x, stats, weight, bias, scale, shift, z_scale, z_shift, needs)
    dx, dwp, dbp, ds, dsh, dsz, dshz = outs
    need = [(needs >> i) & 1 == 1 for i in range(7)]
    need[3:] = [n and t is not None for n, t in zip(need[3:], (scale, shift, z_scale, z_shift))]
    xr, (sxb, sxc, sxs) = _readable(x)
    dyr, (sdyb, sdyc, sdys) = _readable(dy)
    if need[0]:
        dxw, (sdxb, sdxc, sdxs) = _writable(dx, xr, (sxb, sxc, sxs))
    else:
        dxw, (sdxb, sdxc, sdxs) = stats, (0, 0, 0)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    dummy = stats
    pick = lambda t, ok=True: t if (t is not None and ok) else dummy  # noqa: E731
    gpb, bc, bs, single, nw, ngb = _plan(x, num_groups, Cg, HW, True, sxc == 1)
    _agn_bwd_kernel[(B * ngb,)](
        dyr, xr, stats, pick(weight), pick(bias), pick(scale), pick(shift), pick(z_scale), pick(z_shift),
        dxw, pick(dwp, need[1]), pick(dbp, need[2]), pick(ds, need[3]), pick(dsh, need[4]),
        pick(dsz, need[5]), pick(dshz, need[6]),
        num_groups, ngb, C, Cg, HW,
        sdyb, sdyc, sdys, sxb, sxc, sxs, sdxb, sdxc, sdxs,
        *_mod_strides(scale), *_mod_strides(shift), *_mod_strides(z_scale), *_mod_strides(z_shift),
        _bits(weight, bias, scale, shift, z_scale, z_shift), _bits(*need[1:]),
        SILU=silu, NEED_DX=need[0], SINGLE=single, GPB=gpb, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(x.dtype),
        CG=Cg if sxc == 1 else 0, num_warps=nw,
    )
    if need[0] and dxw is not dx:
        dx.copy_(dxw)
    return outs


# ---------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; fake impls give it shapes/strides) + autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("diti_fast::adaptive_group_norm_fwd", mutates_args=())
def _agn_fwd_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                z_scale: Optional[torch.Tensor], z_shift: Optional[torch.Tensor], eps: float,
                silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, silu)


@_agn_fwd_op.register_fake
def _agn_fwd_fake(x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, silu):
    # Same allocations as _launch_fwd, so fake and real outputs agree in strides too.
    return (torch.empty_like(x),
            x.new_empty((x.shape[0], num_groups, 3), dtype=_stat_dtype(x.dtype)))


@torch.library.custom_op("diti_fast::adaptive_group_norm_bwd", mutates_args=())
def _agn_bwd_op(dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                z_scale: Optional[torch.Tensor], z_shift: Optional[torch.Tensor], num_groups: int,
                silu: bool, needs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(dy, x, stats, weight, bias, scale, shift, z_scale, z_shift, num_groups, silu, needs)


@_agn_bwd_op.register_fake
def _agn_bwd_fake(dy, x, stats, weight, bias, scale, shift, z_scale, z_shift, num_groups, silu, needs):
    return _bwd_outputs(x, stats, weight, bias, scale, shift, z_scale, z_shift, needs)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, z_scale, z_shift, eps, silu = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    # x (not x̂) is saved: backward recomputes x̂ from the [B, G, 3] statistics.
    ctx.save_for_backward(x, stats, weight, bias, scale, shift, z_scale, z_shift)
    ctx.num_groups = num_groups
    ctx.silu = silu


def _grads(ctx, dy, bwd):
    """The ten input gradients, the kernel work done by ``bwd`` (the backward op or its launcher)."""
    x, stats, weight, bias, scale, shift, z_scale, z_shift = ctx.saved_tensors
    ng = ctx.needs_input_grad
    want = (ng[0], ng[2], ng[3], ng[4], ng[5], ng[6], ng[7])
    needs = sum(1 << i for i, w in enumerate(want) if w)
    if needs == 0 or dy is None:
        return (None,) * 10
    dx, dwp, dbp, ds, dsh, dsz, dshz = bwd(dy, x, stats, weight, bias, scale, shift, z_scale,
                                           z_shift, ctx.num_groups, ctx.silu, needs)
    # Batch reduction of the per-sample partials: torch.sum is deterministic (no atomics).
    dw = dwp.sum(0).to(weight.dtype) if want[1] else None
    db = dbp.sum(0).to(bias.dtype) if want[2] else None
    return (dx if want[0] else None, None, dw, db,
            ds if want[3] else None, dsh if want[4] else None,
            dsz if want[5] else None, dshz if want[6] else None, None, None)


def _backward(ctx, dy, _dstats):
    return _grads(ctx, dy, _agn_bwd_op)


torch.library.register_autograd("diti_fast::adaptive_group_norm_fwd", _backward, setup_context=_setup_context)


class _AGNFunction(torch.autograd.Function):
    """Eager twin of the custom op: the same launches, setup and gradients, without custom_op's
    Python dispatch layers (its eager call costs more host time than the small launches of the
    8²/16² levels take on the device). torch.compile traces the custom op instead."""

    @staticmethod
    def forward(ctx, *args):
        output = _launch_fwd(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dstats):
        # _launch_bwd looked up at call time (tests spy on it), as the backward op does.
        return _grads(ctx, dy, lambda *a: _launch_bwd(*a))


_EAGER_FUNCTION = True  # False: eager calls go through the custom op too (host-overhead baseline)


def _fwd_apply(*args):
    if _EAGER_FUNCTION and not torch.compiler.is_compiling():
        return _AGNFunction.apply(*args)
    return _agn_fwd_op(*args)
