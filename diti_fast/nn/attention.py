"""QKV self-attention with pluggable backends, reproducing guided-diffusion's two head layouts.

The original packs q, k, v into one [B, 3·H·ch, T] tensor produced by a 1×1 conv. Two orders exist
and the checkpoints depend on which one was trained:

* legacy (``use_new_attention_order=False``): split heads first, then q/k/v —
  channel index = head·3·ch + {0: q, 1: k, 2: v}·ch + c
* new (``use_new_attention_order=True``): split q/k/v first, then heads —
  channel index = {0: q, 1: k, 2: v}·H·ch + head·ch + c

Both return [B, H·ch, T] with channel index head·ch + c. The original scales q and k each by
ch^-1/4, which is the same as the usual 1/sqrt(ch) on the logits (the SDPA default).

Backends (``FastConfig.attention``):

* ``sdpa`` (default): ``F.scaled_dot_product_attention``. On a GPU in bf16/fp16 it runs a flash or
  memory-efficient kernel (never materialising the T×T matrix, softmax in fp32 inside the
  kernel); in fp32 or on CPU it may fall back to its own math path. Flash needs head_dim ≤ 256,
  so a single 512-channel head uses the memory-efficient kernel instead.
* ``xformers``: ``xformers.ops.memory_efficient_attention``; CUDA only and the package is optional.
* ``math``: the original's einsum formulation op for op (softmax in fp32, as the original casts
  the logits with ``.float()`` before it); the reference for tests.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "xformers")


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why and what to use."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; choose one of {BACKENDS}"
    if backend != "xformers":
        return None
    if importlib.util.find_spec("xformers") is None:
        return ("attention backend 'xformers' needs the xformers package (pip install xformers, or the "
                "project's [xformers] extra); use attention: sdpa instead")
    if torch.device(device).type != "cuda":
        return "attention backend 'xformers' has no CPU kernels; use attention: sdpa on CPU"
    return None


def _head_dim(qkv: torch.Tensor, num_heads: int) -> int:
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [B, 3·H·ch, T], got shape {tuple(qkv.shape)}")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(f"qkv width {qkv.shape[1]} is not divisible by 3 x num_heads={num_heads}")
    return qkv.shape[1] // (3 * num_heads)


def _packed(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """[B, 3·H·ch, T] as a 5-D view (B, 3, H, ch, T), whichever layout it was packed in."""
    ch = _head_dim(qkv, num_heads)
    b, _, length = qkv.shape
    if new_order:
        return qkv.reshape(b, 3, num_heads, ch, length)
    return qkv.reshape(b, num_heads, 3, ch, length).transpose(1, 2)


def split_heads(qkv: torch.Tensor, num_heads: int, new_order: bool):
    """[B, 3·H·ch, T] -> q, k, v each [B, H, T, ch] with a unit stride along ch.

    One copy of the whole packed tensor (not three): the fused SDPA kernels need the last
    dimension contiguous and otherwise fall back to the math path.
    """
    x = _packed(qkv, num_heads, new_order).transpose(-1, -2).contiguous()  # (B, 3, H, T, ch)
    return x.unbind(1)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, ch] -> [B, H·ch, T]."""
    b, h, t, ch = out.shape
    return out.transpose(-1, -2).reshape(b, h * ch, t)


def _math_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    # The original formulation, op for op: scale q and k separately, einsum, fp32 softmax, einsum.
    ch = _head_dim(qkv, num_heads)
    b, _, length = qkv.shape
    scale = 1 / math.sqrt(math.sqrt(ch))
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q = (q * scale).reshape(b * num_heads, ch, length)
        k = (k * scale).reshape(b * num_heads, ch, length)
        v = v.reshape(b * num_heads, ch, length)
    else:
        q, k, v = qkv.reshape(b * num_heads, ch * 3, length).split(ch, dim=1)
        q, k = q * scale, k * scale
    logits = torch.einsum("bct,bcs->bts", q, k)
    # The original softmaxes logits.float(): fp32 for half types; fp64 inputs (tests) stay fp64.
    w = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(logits.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


def _sdpa_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    q, k, v = split_heads(qkv, num_heads, new_order)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def _xformers_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    reason = backend_unavailable_reason("xformers", qkv.device)
    if reason:
        raise RuntimeError(reason)
    import xformers.ops as xops  # lazy: optional (the xformers extra)

    x = _packed(qkv, num_heads, new_order)
    # xformers wants [B, T, H, ch] with a unit stride along ch: one copy to (B, T, 3, H, ch).
    q, k, v = x.permute(0, 4, 1, 2, 3).contiguous().unbind(2)
    out = xops.memory_efficient_attention(q, k, v)  # [B, T, H, ch]
    b, length, h, ch = out.shape
    return out.reshape(b, length, h * ch).transpose(1, 2)


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool, backend: str = "sdpa") -> torch.Tensor:
    """Attention over a packed qkv tensor [B, 3·H·ch, T] -> [B, H·ch, T]."""
    if backend == "sdpa":
        return _sdpa_attention(qkv, num_heads, new_order)
    if backend == "math":
        return _math_attention(qkv, num_heads, new_order)
    if backend == "xformers":
        return _xformers_attention(qkv, num_heads, new_order)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def qkv_attention_tokens(qkv: torch.Tensor, num_heads: int, new_order: bool, backend: str = "sdpa") -> torch.Tensor:
    """Attention over packed tokens [B, T, 3·H·ch] (the channels_last block's layout) -> [B, T, H·ch].

    The channel index means the same as in :func:`qkv_attention` (either head layout); only the
    memory order differs. For sdpa / xformers q, k, v are strided views of ``qkv`` (unit stride
    along ch), so nothing is copied before the kernel; math runs the reference on the transposed
    view."""
    if qkv.ndim != 3:
        raise ValueError(f"qkv tokens must be [B, T, 3·H·ch], got shape {tuple(qkv.shape)}")
    b, length, width = qkv.shape
    if backend == "math":
        return _math_attention(qkv.transpose(1, 2), num_heads, new_order).transpose(1, 2)
    ch = _head_dim(qkv.transpose(1, 2), num_heads)
    if new_order:
        q, k, v = qkv.view(b, length, 3, num_heads, ch).unbind(2)          # each [B, T, H, ch]
    else:
        q, k, v = qkv.view(b, length, num_heads, 3, ch).unbind(3)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, length, num_heads * ch)
    if backend == "xformers":
        reason = backend_unavailable_reason("xformers", qkv.device)
        if reason:
            raise RuntimeError(reason)
        import xformers.ops as xops  # lazy: optional (the xformers extra)
        return xops.memory_efficient_attention(q, k, v).reshape(b, length, num_heads * ch)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
