"""Attention backends: sdpa and xformers against the original's math formulation, and all of them
against a per-head loop written here from the layout definitions (not from the module's code)."""
from __future__ import annotations

import math

import pytest
import torch

from diti_fast.nn.attention import BACKENDS, backend_unavailable_reason, qkv_attention
from diti_fast.nn.blocks import AttentionBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loop_reference(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """Per-sample, per-head attention in float64, channels picked by the documented index maps:
    legacy head·3·ch + part·ch + c, new part·H·ch + head·ch + c; output head·ch + c."""
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    x = qkv.double()
    out = torch.empty(b, num_heads * ch, length, dtype=torch.float64, device=qkv.device)
    c = torch.arange(ch, device=qkv.device)
    for i in range(b):
        for h in range(num_heads):
            if new_order:
                idx = [part * num_heads * ch + h * ch + c for part in range(3)]
            else:
                idx = [h * 3 * ch + part * ch + c for part in range(3)]
            q, k, v = (x[i, j] for j in idx)  # each [ch, T]
            w = torch.softmax(q.T @ k / math.sqrt(ch), dim=-1)  # [T(query), T(key)]
            out[i, h * ch + c] = v @ w.T
    return out


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("heads,ch,length", [(1, 8, 16), (2, 4, 7), (4, 3, 9)])
def test_matches_per_head_loop(backend, new_order, heads, ch, length):
    torch.manual_seed(0)
    qkv = torch.randn(3, 3 * heads * ch, length, dtype=torch.float64, device=DEVICE)
    out = qkv_attention(qkv, heads, new_order, backend)
    assert out.shape == (3, heads * ch, length)
    torch.testing.assert_close(out, loop_reference(qkv, heads, new_order), rtol=1e-10, atol=1e-10)


def test_layouts_differ():
    # Guards the loop reference itself: the two orders must not be interchangeable.
    qkv = torch.randn(1, 3 * 2 * 4, 5, dtype=torch.float64)
    assert not torch.allclose(loop_reference(qkv, 2, False), loop_reference(qkv, 2, True))


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
@pytest.mark.parametrize("heads,ch,length", [(1, 16, 64), (4, 8, 36), (2, 5, 13)])
def test_sdpa_matches_math_fp32_forward_backward(new_order, heads, ch, length):
    torch.manual_seed(1)
    base = torch.randn(2, 3 * heads * ch, length, device=DEVICE)
    grad_out = torch.randn(2, heads * ch, length, device=DEVICE)
    outs, grads = [], []
    for backend in ("math", "sdpa"):
        qkv = base.clone().requires_grad_()
        out = qkv_attention(qkv, heads, new_order, backend)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append(qkv.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    # And both against float64 autograd through the independent loop.
    ref_in = base.double().requires_grad_()
    loop_reference(ref_in, heads, new_order).backward(grad_out.double())
    torch.testing.assert_close(grads[1].double(), ref_in.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_sdpa_bf16_within_twice_math_error(new_order):
    torch.manual_seed(2)
    qkv = torch.randn(2, 3 * 2 * 16, 64, device=DEVICE).bfloat16()
    ref = loop_reference(qkv.float(), 2, new_order)
    err = {b: (qkv_attention(qkv, 2, new_order, b).double() - ref).abs().max().item() for b in ("math", "sdpa")}
    assert err["sdpa"] <= 2 * err["math"] + 2 ** -8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_attention_block_backends_agree(backend, new_order):
    reason = backend_unavailable_reason(backend, DEVICE)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(3)
    block = AttentionBlock(64, num_heads=2, new_order=new_order).to(DEVICE)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # zero-init would hide the attention
    x = torch.randn(2, 64, 6, 6, device=DEVICE)
    block.attention = "math"
    ref = block(x)
    block.attention = backend
    torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_xformers_matches_math(new_order):
    reason = backend_unavailable_reason("xformers", DEVICE)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(4)
    base = torch.randn(2, 3 * 4 * 16, 64, device=DEVICE)
    grad_out = torch.randn(2, 4 * 16, 64, device=DEVICE)
    res = []
    for backend in ("math", "xformers"):
        qkv = base.clone().requires_grad_()
        out = qkv_attention(qkv, 4, new_order, backend)
        out.backward(grad_out)
        res.append((out.detach(), qkv.grad))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-3, atol=1e-3)


def test_xformers_unavailable_error_names_alternative():
    reason = backend_unavailable_reason("xformers", "cpu")
    assert reason is not None and "sdpa" in reason
    with pytest.raises(RuntimeError, match="sdpa"):
        qkv_attention(torch.randn(1, 6, 4), 1, False, "xformers")


def test_bad_inputs():
    with pytest.raises(ValueError, match="backend"):
        qkv_attention(torch.randn(1, 6, 4), 1, False, "flash")
    with pytest.raises(ValueError, match="num_heads"):
        qkv_attention(torch.randn(1, 12, 4), 3, False, "sdpa")
    with pytest.raises(ValueError, match="qkv"):
        qkv_attention(torch.randn(6, 4), 1, False, "math")
