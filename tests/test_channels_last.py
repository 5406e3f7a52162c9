"""channels_last end to end (``fast.channels_last``): the same numbers as NCHW, without layout copies.

Every comparison is against the NCHW reference path of the same weights and inputs: the loss and
every trainable gradient of a DiTi step (unfused, and with both Triton kernels through the
interpreter), the attention block in either head layout and backend, and the golden fixture
recorded from the original code. The copy census counts what PyTorch itself would copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from diti_fast.config import FastConfig
from diti_fast.engine.objective import Objective
from diti_fast.engine.config_files import apply_overrides, build_config
from diti_fast.nn.blocks import AttentionBlock
from diti_fast.reference.check import run_check

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_census import OpCensus  # noqa: E402
from test_train_engine import TINY as ENGINE_TINY  # noqa: E402

CL = torch.channels_last
TINY = {
    "model": ENGINE_TINY["model"],   # the engine tests' tiny DiTi (32 px, dropout 0)
    "init": {"ddpm": "unused.safetensors"},
    "data": {"source": "fixed", "batch_size": 2},
}


def _objective(channels_last: bool, fused: bool, state=None) -> Objective:
    flag = lambda b: str(b).lower()  # noqa: E731
    cfg = build_config(apply_overrides(TINY, [f"fast.channels_last={flag(channels_last)}",
                                              f"fast.fused_norm={flag(fused)}", f"fast.fused_loss={flag(fused)}"]))
    torch.manual_seed(0)
    obj = Objective(cfg, torch.device("cpu"), autocast=False)
    obj.channels_last_weights()
    if state is not None:
        obj.load_state_dict(state)
    # Non-zero output convolutions, so G and ε̂ depend on every layer of both networks.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in obj.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return obj.train()


def _step(obj: Objective):
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out, _ = obj(x0, torch.arange(5, 7))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in obj.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-kernels"])
def test_a_channels_last_step_gives_the_nchw_loss_and_gradients_without_layout_copies(fused):
    ref = _objective(False, fused)
    cl = _objective(True, fused, ref.state_dict())
    assert cl.decoder.input_blocks[0][0].weight.is_contiguous(memory_format=CL)
    with OpCensus() as nchw:
        loss_ref, grads_ref = _step(ref)
    with OpCensus() as census:
        loss_cl, grads_cl = _step(cl)
    torch.testing.assert_close(loss_cl, loss_ref, rtol=1e-6, atol=0)
    assert grads_ref.keys() == grads_cl.keys() and len(grads_ref) > 50
    moved, top = 0, max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads_ref.items():
        # fp32 rounding of a different summation order (conv algorithms, linear vs 1x1 conv),
        # relative to the tensor's own scale; the biases of convs feeding a GroupNorm have an
        # exact gradient of 0, so theirs is rounding noise, bounded by the model's scale instead.
        tol = 2e-5 * g.abs().max().item() + 1e-6 * top
        torch.testing.assert_close(grads_cl[name], g, rtol=0, atol=tol, msg=name)
        moved += bool(g.abs().max() > 0)
        if grads_cl[name].ndim == 4 and grads_cl[name].shape[-1] > 1:
            # gradients arrive in the parameters' layout (no AccumulateGrad conversion)
            assert grads_cl[name].is_contiguous(memory_format=CL), name
    assert moved > 50

    # Layout copies (what PyTorch would copy behind the code's back is counted too). The explicit
    # ones: x0 and ε into channels_last (Objective.forward), and the encoder's last feature map
    # into NCHW for its linear head (and, after the unfused norm, its gradient back). Nothing
    # inside the UNets or the attention blocks, where the NCHW step copies q/k/v every call.
    copies = [(c.shape, c.dst_stride[1] == 1) for c in census.layout_copies]
    explicit = [((2, 3, 32, 32), True), ((2, 3, 32, 32), True), ((2, 128, 4, 4), False)]
    assert copies[:3] == explicit, census.layout_copies
    assert copies[3:] in ([], [((2, 128, 4, 4), True)]), census.layout_copies
    assert len(nchw.layout_copies) >= 3


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("new_order", [False, True])
def test_the_attention_block_on_tokens_equals_the_nchw_block(backend, new_order):
    torch.manual_seed(0)
    ref = AttentionBlock(64, num_heads=2, new_order=new_order)
    with torch.no_grad():
        ref.proj_out.weight.normal_(0, 0.1)
    ref.attention = backend
    cl = AttentionBlock(64, num_heads=2, new_order=new_order)
    cl.load_state_dict(ref.state_dict())
    cl.attention, cl.channels_last = backend, True
    x = torch.randn(2, 64, 8, 8)
    xr = x.clone().requires_grad_()
    xc = x.contiguous(memory_format=CL).requires_grad_()
    yr, yc = ref(xr), cl(xc)
    assert yc.is_contiguous(memory_format=CL)
    torch.testing.assert_close(yc, yr, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yc * w).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(ref.named_parameters(), cl.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_the_golden_fixture_passes_in_channels_last(fixture_path):
    # Every 3x3 convolution the checker runs, with the layout of its input and weight: the check
    # must really have run the models in channels_last (not silently in NCHW).
    seen = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            x = args[0]
            seen.append((x.is_contiguous(memory_format=CL) and not x.is_contiguous(),
                         module.weight.is_contiguous(memory_format=CL) and not module.weight.is_contiguous(),
                         output.is_contiguous(memory_format=CL)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        rows = run_check(fixture_path, FastConfig(channels_last=True), skip_ddim=True)
    finally:
        handle.remove()
    bad = [r.name for r in rows if not r.ok]
    assert not bad and len(rows) > 20, bad
    assert len(seen) > 20 and all(all(s) for s in seen), [i for i, s in enumerate(seen) if not all(s)][:10]


def test_channels_last_auto_means_cuda_only():
    from diti_fast.config import channels_last_on
    assert channels_last_on(FastConfig(), "cuda") and not channels_last_on(FastConfig(), "cpu")
    assert channels_last_on(FastConfig(channels_last=True), "cpu")
    assert not channels_last_on(FastConfig(channels_last=False), "cuda")
