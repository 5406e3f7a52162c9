"""The fastest CPU path for the claim's training, measured at the start of the run.

Each candidate (fp32; bf16 autocast; channels_last and torch.compile on top of the faster precision)
runs a few DDPM optimiser steps of the claim preset's UNet on one fixed batch. The rate counts
steady steps only; torch.compile's compile time is recorded beside it and charged to every training
run that would pay it. A candidate is eligible when its loss on the fixed batch at the initial
weights (moved off the zero output by a small random perturbation) agrees with fp32's
within ``LOSS_AGREEMENT``. The chosen one maximises the images a run of
``run_seconds`` would train.
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import time

import torch

from ..diffusion import make_schedule
from ..losses import ddpm_objective
from ..nn import UNet

LOSS_AGREEMENT = 0.01  # relative


def _probe(unet0, cfg, precision: str, channels_last: bool, compile_: bool, batch: int, steps: int,
           warmup: int, seed: int = 0) -> dict:
    unet = copy.deepcopy(unet0)
    sched = make_schedule(cfg.diffusion)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 3, 16, 16), generator=g) * 2 - 1
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x0, eps = x0.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    model = torch.compile(unet) if compile_ else unet
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)

    def loss_of():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return ddpm_objective(model, x0, t, eps, sched).loss

    t_start = time.perf_counter()
    first = float(loss_of().detach())
    times = []
    for i in range(warmup + steps):
        a = time.perf_counter()
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - a)
        elif i == warmup - 1:
            setup = time.perf_counter() - t_start
    step = sorted(times)[len(times) // 2]
    return {"precision": precision, "channels_last": channels_last, "compile": compile_,
            "images_per_s": batch / step, "setup_s": setup if warmup else 0.0, "initial_loss": first}


def choose(model_cfg, batch: int, run_seconds: float, steps: int = 10, compile_steps: int = 3,
           compile_timeout: float = 150.0, log=print) -> dict:
    """Probe the candidates; return the chosen one plus every measurement."""
    torch.manual_seed(0)
    unet0 = UNet(model_cfg.unet)
    # The UNet's output conv starts at zero, so every candidate's initial loss would be mean(ε²)
    # whatever its arithmetic: compare the candidates on weights moved off that point.
    with torch.no_grad():
        for prm in unet0.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    rows = []

    def run(precision, cl, comp):
        r = (_probe_compiled(unet0, model_cfg, precision, batch, steps, compile_steps, compile_timeout) if comp
             else _probe(unet0, model_cfg, precision, cl, comp, batch, steps, 2))
        rows.append(r)
        log(f"speed probe: {precision}{' channels_last' if cl else ''}{' compile' if comp else ''}: "
            f"{r['images_per_s']:.0f} images/s (setup {r['setup_s']:.1f} s), initial loss {r['initial_loss']:.5f}")
        return r

    ref = run("fp32", False, False)
    bf = run("bf16", False, False)
    agrees = abs(bf["initial_loss"] - ref["initial_loss"]) <= LOSS_AGREEMENT * abs(ref["initial_loss"])
    prec = "bf16" if agrees and bf["images_per_s"] > ref["images_per_s"] else "fp32"
    run(prec, True, False)
    try:
        run(prec, False, True)
    except CompileTimeout as e:
        log(f"speed probe: {prec} compile: {e}")
        rows.append({"precision": prec, "channels_last": False, "compile": True, "images_per_s": 0.0,
                     "setup_s": float(compile_timeout), "initial_loss": float("nan"), "failed": str(e)})
    for r in rows:
        r["loss_rel_diff"] = abs(r["initial_loss"] - ref["initial_loss"]) / abs(ref["initial_loss"])
        r["agrees"] = bool(r["loss_rel_diff"] <= LOSS_AGREEMENT)  # nan (a failed probe) never agrees
        r["images_per_run"] = r["images_per_s"] * max(0.0, run_seconds - (r["setup_s"] if r["compile"] else 0.0))
    best = max((r for r in rows if r["agrees"]), key=lambda r: r["images_per_run"])
    return {"candidates": rows, "chosen": best, "loss_agreement": LOSS_AGREEMENT, "batch": batch,
            "run_seconds": run_seconds}


class CompileTimeout(RuntimeError):
    pass


def _compiled_child(q, unet0, cfg, precision, batch, steps, warmup) -> None:
    q.put(_probe(unet0, cfg, precision, False, True, batch, steps, warmup))


def _probe_compiled(unet0, cfg, precision, batch, steps, warmup, timeout: float) -> dict:
    """The compile candidate in a child process, so that a compile slower than ``timeout`` seconds
    is cut off and recorded instead of eating the run's budget."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: forking a process with a live OpenMP pool is unsafe
    q = ctx.Queue()
    p = ctx.Process(target=_compiled_child, args=(q, unet0, cfg, precision, batch, steps, warmup))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        raise CompileTimeout(f"compile and {warmup} warm-up steps did not finish in {timeout:.0f} s")
    try:
        return q.get(timeout=10)
    except Exception:
        raise CompileTimeout(f"the compile probe died (exit code {p.exitcode})") from None


def overrides(choice: dict) -> list[str]:
    """The engine's config overrides for a probe row."""
    return [f"run.precision={choice['precision']}", f"fast.channels_last={str(choice['channels_last']).lower()}",
            f"fast.compile={str(choice['compile']).lower()}"]
