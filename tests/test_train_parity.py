"""The engine's DiTi training step against the method's equations, step by step.

A few paired steps: the engine (DeepSpeed, fused Adam, its loss code) and a re-statement of DiTi's
training step written here from the method's equations (the noise schedule, the shift coefficient
c_t, the weight w_t, the chunk-prefix mask of z, the loss, Adam), nothing of the engine's schedule,
mask, loss or optimiser code. Paired: the same initial weights (built under the same seed, the frozen
DDPM loaded into both), the same batches (the fixed batch), the same t and ε per sample (the engine's
keyed draws, as benchmarks/parity.py pairs its runs). The losses of every step, overall and per
t-bucket, must agree to float32 rounding, and so must the trained weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diti_fast.engine import noise
from diti_fast.engine.loop import train
from diti_fast.engine.microbatches import fixed_batch
from diti_fast.engine.objective import Objective, load_frozen_ddpm
from test_train_engine import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, T = 4, 4, 1000
# A staged chunk layout (k = 8 chunks over 64 dims), so the prefix ends are uneven: chunk i covers
# t in [ceil(125 i), ceil(125 (i+1))) and belongs to the first stage boundary strictly greater than
# its start; chunks per stage: 1 (t < 100), 3 (start < 500), 4. Within a stage of n chunks and d dims
# (after the previous stages' dims), chunk j ends at floor(d / n)·(j + 1), the last at d:
#   stage 0: 5;  stage 1 (5 + 30 dims, 3 chunks): 15, 25, 35;  stage 2 (35 + 29, 4 chunks): 42, 49, 56, 64.
STAGES = ["model.masks.stages=[100,500,1000]", "model.masks.dims_per_stage=[5,30,29]"]
PREFIX_END = torch.tensor([5, 15, 25, 35, 42, 49, 56, 64])
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
# 64 channels: two per GroupNorm group. With one, the gradients of the biases just before a
# GroupNorm are exactly zero up to rounding noise, which Adam's first steps (about ±lr whatever the
# gradient's size) turn into weight differences of the order of lr between any two implementations.
WIDE = ["model.unet.base_channel=64"]


def schedule():
    """β linear in float32 from 1e-4 to 0.02; ᾱ its cumulative product of (1 - β);
    c_t = -sqrt(α_t)(1 - ᾱ_{t-1}) / sqrt(1 - ᾱ_t) with ᾱ_{-1} = 1; w_t = snr^0.1 / (1 + snr)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float32).double()
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    c = -alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar).sqrt()
    snr = abar / (1.0 - abar)
    w = snr ** 0.1 / (1.0 + snr)
    return {k: v.float() for k, v in (("abar", abar), ("c", c), ("w", w))}


def reference_run(cfg) -> tuple[list[float], list[list[float]], dict[str, torch.Tensor]]:
    """DiTi's training step written out: per step the losses (mean, per t-bucket) and at the end the
    trained parameters."""
    torch.manual_seed(cfg.run.seed)          # the engine's initial weights: same seed, same builder
    models = Objective(cfg, torch.device("cpu"), autocast=False)
    load_frozen_ddpm(models.decoder, cfg)
    encoder, decoder = models.encoder.train(), models.decoder.train()
    params = {n: p for n, p in models.named_parameters() if p.requires_grad}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    sch = schedule()
    x0 = fixed_batch(cfg, 32).float() / 127.5 - 1.0   # uint8 images into [-1, 1]
    latent = cfg.model.unet.latent_dim
    losses, buckets = [], []
    for step in range(1, STEPS + 1):
        t, eps = noise.draw(cfg.run.seed, torch.arange((step - 1) * BATCH, step * BATCH), tuple(x0.shape[1:]), T)
        z = encoder(x0)
        chunk = t * 8 // T                                                   # 8 chunks of the 1000 steps
        mask = (torch.arange(latent)[None, :] < PREFIX_END[chunk][:, None]).float()
        ab = sch["abar"][t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        eps_hat, g = decoder(x_t, t, z * mask)
        c, w = sch["c"][t].view(-1, 1, 1, 1), sch["w"][t].view(-1, 1, 1, 1)
        per_elem = w * (eps - eps_hat - c * g) ** 2
        loss = per_elem.mean()
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():                                                # Adam, no weight decay
            for n, p in params.items():
                m[n].mul_(BETAS[0]).add_((1 - BETAS[0]) * p.grad)
                v[n].mul_(BETAS[1]).add_((1 - BETAS[1]) * p.grad * p.grad)
                m_hat = m[n] / (1 - BETAS[0] ** step)
                v_hat = v[n] / (1 - BETAS[1] ** step)
                p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
        per_sample = per_elem.detach().flatten(1).mean(1)
        b = t * 10 // T
        losses.append(loss.item())
        buckets.append([per_sample[b == i].mean().item() if (b == i).any() else None for i in range(10)])
    return losses, buckets, {n: p.detach() for n, p in params.items()}


@pytest.fixture(scope="module")
def ddpm_export(tmp_path_factory) -> Path:
    """A tiny frozen DDPM exported by the engine's ddpm stage (trained at 16 px, used at 32 px)."""
    run = tmp_path_factory.mktemp("ddpm")
    res = train(tiny(run, *WIDE, "stage=ddpm", "data.image_size=16", "run.max_images=8"))
    assert res.status == "done"
    return res.export


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-loss"])
def test_engine_steps_equal_the_methods_equations(tmp_path, ddpm_export, fused):
    """The engine's losses and weights after each of a few DiTi steps against the re-statement above;
    ``fused-loss``: with the Triton loss kernel (interpreted on a CPU)."""
    overrides = [f"init.ddpm={ddpm_export}", f"run.max_images={STEPS * BATCH}", f"data.batch_size={BATCH}",
                 "run.precision=fp32", f"optim.lr={LR}", "optim.lr_rule=none",
                 f"fast.fused_loss={str(fused).lower()}", "log.t_buckets=10", "ema.decay=0.9", *STAGES, *WIDE]
    run = tmp_path / "engine"
    res = train(tiny(run, *overrides))
    assert res.status == "done" and res.step == STEPS
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    final = torch.load(run / f"checkpoints/step-{STEPS:08d}/model.pt", weights_only=True)["module"]

    ref_losses, ref_buckets, ref_params = reference_run(tiny(tmp_path / "unused", *overrides))
    # Float32 rounding of two summation orders, carried through a few steps (measured: the mean
    # within 2e-7, the buckets within 4e-6 relative; a bucket's mean is over one or two samples).
    for step, (rec, want, want_b) in enumerate(zip(recs, ref_losses, ref_buckets), 1):
        assert math.isclose(rec["loss"], want, rel_tol=1e-6), (step, rec["loss"], want)
        for i, (got, wb) in enumerate(zip(rec["loss_t"], want_b)):
            assert (got is None) == (wb is None), (step, i)
            assert got is None or math.isclose(got, wb, rel_tol=2e-5), (step, i, got, wb)
    # The trained weights, in units of Adam's step (each step moves a weight by about lr): rounding
    # differences in a gradient move it by a small fraction of that (measured: 2.2e-3 lr at most).
    assert set(ref_params) <= set(final) and len(ref_params) > 50
    for name, want in ref_params.items():
        torch.testing.assert_close(final[name].float(), want, rtol=0, atol=1e-2 * LR, msg=name)
