"""QKV self-attention with pluggable backends, reproducing guided-diffusion's two head layouts.

The original packs q, k, v into one [B, 3·H·ch, T] tensor produced by a 1×1 conv. Two orders exist
and the checkpoints depend on which one was trained:

* legacy (``use_new_attention_order=False``): split heads first, then q/k/v —
  channel index = head·3·ch + {0: q, 1: k, 2: v}·ch + c
* new (``use_new_attention_order=True``): split q/k/v first, then heads —
  channel index = {0: q, 1: k, 2: v}·H·ch + head·ch + c

Both return [B, H·ch, T] with channel index head·ch + c. The original scales q and k each by
ch^-1/4, which is the same as the usual 1/sqrt(ch) on the logits (the SDPA default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "xformers")


def split_heads(qkv: torch.Tensor, num_heads: int, new_order: bool):
    """[B, 3·H·ch, T] -> q, k, v each [B, H, T, ch] (views where possible)."""
    b, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 x num_heads={num_heads}")
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.reshape(b, 3, num_heads, ch, length).unbind(1)
    else:
        q, k, v = qkv.reshape(b, num_heads, 3, ch, length).unbind(2)
    return q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, ch] -> [B, H·ch, T]."""
    b, h, t, ch = out.shape
    return out.transpose(-1, -2).reshape(b, h * ch, t)


def _math_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    # The original formulation, op for op: scale q and k separately, einsum, softmax, einsum.
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q = (q * scale).reshape(b * num_heads, ch, length)
        k = (k * scale).reshape(b * num_heads, ch, length)
        v = v.reshape(b * num_heads, ch, length)
    else:
        q, k, v = qkv.reshape(b * num_heads, ch * 3, length).split(ch, dim=1)
        q, k = q * scale, k * scale
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


def _sdpa_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    q, k, v = split_heads(qkv, num_heads, new_order)
    # SDPA picks flash / memory-efficient kernels on CUDA for bf16/fp16 and falls back to math on CPU.
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def _xformers_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "attention backend 'xformers' needs the xformers package (pip install xformers); "
            "use attention: sdpa instead") from e
    if not qkv.is_cuda:
        raise RuntimeError("attention backend 'xformers' has no CPU kernels; use attention: sdpa on CPU")
    q, k, v = split_heads(qkv, num_heads, new_order)
    # xformers wants [B, T, H, ch]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return merge_heads(out.transpose(1, 2))


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool, backend: str = "sdpa") -> torch.Tensor:
    """Attention over a packed qkv tensor [B, 3·H·ch, T] -> [B, H·ch, T]."""
    if backend == "sdpa":
        return _sdpa_attention(qkv, num_heads, new_order)
    if backend == "math":
        return _math_attention(qkv, num_heads, new_order)
    if backend == "xformers":
        return _xformers_attention(qkv, num_heads, new_order)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
