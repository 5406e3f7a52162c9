"""Run-level parity: whole short DiTi runs compared per t-bucket, with intervals.

    python benchmarks/parity.py [--cases fp32,bf16] [--steps 300] [--threads 1] [--parallel]
                                [--work runs/parity] [--data SHARDS] [--ddpm RUN_DIR]
                                [--out benchmarks/results/parity]
    DITI_ORIGINAL=/tmp/diti_orig python benchmarks/parity.py --cases fp32,bf16,original,original_first5k \
        --data runs/claim/data/train --ddpm runs/claim/ddpm --threads 2

Every case trains DiTi (base) for ``--steps`` steps from the same frozen DDPM on the same shards
(the synthetic ``clear`` variant), batch 32, logging the loss of every step per t-bucket (10 equal
ranges of t). The statistic is the mean loss per bucket over the last 100 steps, as a ratio to the
``fp32`` case with a 95% bootstrap interval over steps. Every case is *paired* with ``fp32``: the
same initial weights, the same batches, the same t and ε per sample (keyed by the seed and the
sample's index), so the bootstrap resamples the same steps for both, which removes the sampling
noise they share and leaves the difference the code makes.

* ``fp32`` / ``bf16`` (``run.precision``): this engine in float32 and under bf16 autocast.
* ``original`` (``DITI_ORIGINAL`` = an extracted copy of github.com/yue-zhongqi/diti, never part of
  this repository): the original's ShiftUNet and ``GaussianDiffusion.pdae_timestep_loss``, stepped as
  its trainer does (torch Adam, fp32), with the engine's t/ε draws handed to its ``torch.randint`` /
  ``randn_like`` calls. At 32 px it trains the engine's shapes32 encoder (the original's smallest
  encoder is celeba64; ``--image-size 64`` uses that one, at four times the cost).
* ``original_first5k``: the same without the ``decoder.eval()`` that the original's trainer first
  calls at its first evaluation (``evaluate_every_steps``: 5000 in the released configs). This checks
  a suspicion that the frozen path runs with dropout until then. It does not: the ShiftUNet's
  constructor ends with ``freeze()``, which already puts the frozen blocks in eval mode. Measured:
  identical to ``original``.

``--ddpm`` / ``--data`` reuse a trained DDPM and its shards (e.g. the claim run's, whose DDPM
passed a recognisability check); without them a small DDPM is trained once for ``--ddpm-steps``.

Outputs: ``parity.json`` (settings, command, commit, per-case per-bucket means, ratios and
intervals, timings) and ``parity.png`` (ratio per bucket with intervals; loss curves).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAST = 100
BATCH = 32
ORIGINAL_CASES = {"original", "original_first5k"}


def model_overrides(image_size: int) -> tuple[str, list[str]]:
    if image_size == 32:
        return "shapes32", []
    # The original's celeba64 encoder at 64 px, with the demo's small UNet (as bench_engine.py).
    return "celeba64", ["model.unet.base_channel=32", "model.unet.channel_multiplier=[1,2,2]",
                        "model.unet.num_residual_blocks_of_a_block=1", "model.unet.attention_resolutions=[4]",
                        "model.unet.dropout=0.1", "optim.lr_rule=none", "optim.lr=2e-4",
                        # The CPU settings of shapes32: one process, eager, no Triton (interpreted on CPU).
                        "deepspeed.zero_stage=0", "fast.compile=false", "fast.fused_norm=false",
                        "fast.fused_loss=false", "ema.decay=0.999", "ema.warmup=true"]


def common(args, run_dir: Path) -> list[str]:
    return [f"data.shards={data_dir(args)}", f"run.dir={run_dir}", "run.device=cpu",
            f"run.threads={args.threads}", f"data.batch_size={BATCH}", "data.num_workers=1", "data.hflip=false",
            "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "checkpoint.on_signal=false"]


def data_dir(args) -> Path:
    return args.data or args.work / "data"


def ddpm_dir(args) -> Path:
    return args.ddpm or args.work / "ddpm"


def prepare(args) -> Path:
    """Shards and the frozen DDPM (cached in the work directory), unless --data / --ddpm name them."""
    from data_shards.synthetic import make_synthetic_shards
    from diti_fast.engine.loop import train
    from diti_fast.engine.config_files import load_config
    from diti_fast.weights import export_path
    if args.data is None and not (args.work / "data" / "manifest.json").is_file():
        make_synthetic_shards(args.work / "data", 4000, image_size=args.image_size, seed=0, maxcount=1000,
                              variant="clear")
    ddpm = ddpm_dir(args)
    if args.ddpm is not None and not export_path(ddpm).is_file():
        raise SystemExit(f"--ddpm {ddpm}: no export at {export_path(ddpm)}")
    if not export_path(ddpm).is_file():
        config, over = model_overrides(args.image_size)
        train(load_config(config, over + common(args, ddpm) + [
            "stage=ddpm", f"run.max_images={args.ddpm_steps * BATCH}", "log.every=50"]))
    return ddpm


# --------------------------------------------------------------------------- workers (own processes)

def worker_engine(args, case: str, out: Path) -> None:
    from diti_fast.engine.loop import train
    from diti_fast.engine.config_files import load_config
    run = args.work / case
    shutil.rmtree(run, ignore_errors=True)  # a case always starts from scratch
    config, over = model_overrides(args.image_size)
    precision = {"fp32": "fp32", "bf16": "bf16"}[case]
    t0 = time.perf_counter()
    train(load_config(config, over + common(args, run) + [
        f"init.ddpm={ddpm_dir(args)}", f"run.max_images={args.steps * BATCH}", f"run.precision={precision}",
        "log.every=1", "log.t_buckets=10", "checkpoint.resume=false"]))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    out.write_text(json.dumps({"loss_t": [r["loss_t"] for r in recs], "loss": [r["loss"] for r in recs],
                               "wall_s": time.perf_counter() - t0}))


def worker_original(args, case: str, out: Path) -> None:
    """The original's ShiftUNet and ``GaussianDiffusion.pdae_timestep_loss``, stepped as its trainer
    does (torch Adam, plain fp32), paired with the engine's fp32 case: the same initial weights (built by
    the engine's Objective under the same seed, then loaded into the original's modules), the same
    batches (the engine's MicroBatches), the same t and ε per sample (the engine's keyed draws, handed
    to the original's ``torch.randint``/``torch.randn_like`` calls) and the same dropout seed.

    ``original``: with the ``decoder.eval()`` of its trainer's first evaluation (``set_train_mode``
    then re-enables only the shift branch). ``original_first5k``: without it, as before that first
    evaluation; the constructor's ``freeze()`` already puts the frozen blocks in eval mode, so the
    two should agree.
    """
    import contextlib
    from unittest import mock

    import torch
    sys.path.insert(0, os.environ["DITI_ORIGINAL"])
    from model.diffusion import GaussianDiffusion
    from model.unet import ShiftUNet

    from diti_fast.config import to_dict
    from diti_fast.data import to_model_input
    from diti_fast.engine import noise
    from diti_fast.engine.distributed import Ranks
    from diti_fast.engine.microbatches import MicroBatches
    from diti_fast.engine.objective import Objective, load_frozen_ddpm
    from diti_fast.engine.config_files import load_config
    from diti_fast.masks import TimestepMasks
    if args.threads:
        torch.set_num_threads(args.threads)
    config, over = model_overrides(args.image_size)
    cfg = load_config(config, over + common(args, args.work / case) + [f"init.ddpm={ddpm_dir(args)}"])
    u, m = cfg.model.unet, cfg.model
    torch.manual_seed(cfg.run.seed)  # as the engine: the same initial encoder and shift branch
    ours = Objective(cfg, torch.device("cpu"), autocast=False)
    load_frozen_ddpm(ours.decoder, cfg)
    decoder = ShiftUNet(**{**to_dict(u), "channel_multiplier": tuple(u.channel_multiplier),
                           "attention_resolutions": tuple(u.attention_resolutions)})
    decoder.load_state_dict(ours.decoder.state_dict(), strict=True)
    if args.image_size == 64:
        from model.representation.encoder.celeba64 import CELEBA64Encoder
        encoder = CELEBA64Encoder(latent_dim=u.latent_dim)
        encoder.load_state_dict(ours.encoder.state_dict(), strict=True)
    else:
        # The original has no 32-px encoder (its smallest is celeba64): this case trains the engine's
        # shapes32 encoder module inside the original's loop, loss and shift decoder.
        encoder = ours.encoder
    for name in ("time_embed", "input_blocks", "middle_block", "output_blocks", "out"):
        getattr(decoder, name).requires_grad_(False)
    params = [p for p in list(encoder.parameters()) + list(decoder.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.optim.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    diffusion = GaussianDiffusion(to_dict(m.diffusion), device="cpu")
    tm = TimestepMasks.build(m.masks, u.latent_dim, m.diffusion.timesteps)
    tables = tm.tables()
    data = MicroBatches(cfg, Ranks(0, 1, torch.device("cpu"), BATCH), args.image_size, None)
    if case == "original":
        decoder.eval()  # what its first evaluation leaves behind; set_train_mode re-enables the shift branch
    torch.manual_seed(cfg.run.seed * 1_000_003)  # dropout, as the engine seeds it
    T, nb = m.diffusion.timesteps, 10
    loss_t, losses = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x0 = to_model_input(data.next(0), "cpu")
        index = noise.first_index(step, BATCH, 0, 1, 0, BATCH) + torch.arange(BATCH)  # global sample indices
        t_draw, eps_draw = noise.draw(cfg.run.seed, index, tuple(x0.shape[1:]), T)
        encoder.train()
        decoder.set_train_mode()
        opt.zero_grad()
        # The original draws t and ε inside pdae_timestep_loss; hand it the engine's draws instead.
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch, "randint", lambda *a, **k: t_draw.clone()))
            stack.enter_context(mock.patch.object(torch, "randn_like", lambda *a, **k: eps_draw.clone()))
            loss, elem, t = diffusion.pdae_timestep_loss(encoder, decoder, x0, tm.t_to_idx, tables["masks"],
                                                         tables["k_masks"], tables["receding_masks"], "base")
        assert torch.equal(t, t_draw)
        per = elem.detach().flatten(1).mean(1)
        b = (t * nb) // T
        loss_t.append([float(per[b == i].mean()) if (b == i).any() else None for i in range(nb)])
        losses.append(loss.item())
        loss.backward()
        opt.step()
    out.write_text(json.dumps({"loss_t": loss_t, "loss": losses, "wall_s": time.perf_counter() - t0}))


def start_case(args, case: str) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--steps", str(args.steps),
           "--threads", str(args.threads), "--work", str(args.work), "--image-size", str(args.image_size)]
    cmd += [x for opt, v in (("--data", args.data), ("--ddpm", args.ddpm)) if v is not None for x in (opt, str(v))]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish_case(args, case: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    out = args.work / f"{case}.json"
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{case} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- statistics

def bucket_table(loss_t: list, last: int = LAST) -> np.ndarray:
    """[steps, buckets] per-step bucket means of the last ``last`` steps, NaN where a bucket was empty."""
    return np.array([[np.nan if v is None else v for v in row] for row in loss_t[-last:]], np.float64)


def ratio_intervals(case: np.ndarray, base: np.ndarray, paired: bool, n_boot: int = 2000, seed: int = 0) -> list:
    """Per bucket: mean(case) / mean(base) over steps, with a 95% bootstrap interval over steps
    (the same resampled steps for both when ``paired``)."""
    rng = np.random.default_rng(seed)
    S = len(case)
    out = []
    for b in range(case.shape[1]):
        c, r = case[:, b], base[:, b]
        i1 = rng.integers(0, S, (n_boot, S))
        i2 = i1 if paired else rng.integers(0, S, (n_boot, S))
        boot = np.nanmean(c[i1], 1) / np.nanmean(r[i2], 1)
        out.append({"ratio": float(np.nanmean(c) / np.nanmean(r)), "lo": float(np.nanquantile(boot, 0.025)),
                    "hi": float(np.nanquantile(boot, 0.975)), "case_mean": float(np.nanmean(c)),
                    "base_mean": float(np.nanmean(r))})
    return out


def within(intervals: list, tol: float = 0.05) -> bool:
    return all(1 - tol <= iv["lo"] and iv["hi"] <= 1 + tol for iv in intervals)


def plot(results: dict, comparisons: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (case, ivs) in enumerate(comparisons.items()):
        x = np.arange(len(ivs)) + (k - (len(comparisons) - 1) / 2) * 0.2
        r = np.array([iv["ratio"] for iv in ivs])
        a1.errorbar(x, r, yerr=[r - [iv["lo"] for iv in ivs], [iv["hi"] for iv in ivs] - r], fmt="o", capsize=3,
                    label=f"{case} / fp32")
    a1.axhspan(0.95, 1.05, color="grey", alpha=0.15, label="±5%")
    a1.set_xticks(range(10))
    a1.set_xticklabels([f"{100 * i}-{100 * i + 99}" for i in range(10)], rotation=45, fontsize=7)
    a1.set_xlabel("t bucket")
    a1.set_ylabel(f"mean loss ratio, last {LAST} steps")
    a1.legend(fontsize=8)
    for case, res in results.items():
        loss = np.array(res["loss"], np.float64)
        k = 10
        a2.plot(np.convolve(loss, np.ones(k) / k, mode="valid"), label=case, lw=1)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("loss (10-step mean)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default="fp32,bf16",
                    help="comma-separated: fp32 (the baseline), bf16, original, original_first5k")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ddpm-steps", type=int, default=400, help="length of the frozen DDPM's own training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    ap.add_argument("--work", type=Path, default=Path("runs/parity"))
    ap.add_argument("--data", type=Path, default=None, help="shards to train on (default: WORK/data, made once)")
    ap.add_argument("--ddpm", type=Path, default=None,
                    help="a ddpm-stage run directory to freeze (default: WORK/ddpm, trained once for --ddpm-steps)")
    ap.add_argument("--parallel", action="store_true", help="run the cases at the same time")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "parity")
    args = ap.parse_args(argv)
    if args.worker:
        args.work.mkdir(parents=True, exist_ok=True)
        out = args.work / f"{args.worker}.json"
        if args.worker in ORIGINAL_CASES:
            worker_original(args, args.worker, out)
        else:
            worker_engine(args, args.worker, out)
        return 0
    if args.steps < LAST:
        raise SystemExit(f"--steps must be >= {LAST} (the statistic is over the last {LAST} steps)")
    cases = args.cases.split(",")
    if "fp32" not in cases:
        raise SystemExit("--cases must include fp32 (the baseline of every comparison)")
    if set(cases) & ORIGINAL_CASES and not os.environ.get("DITI_ORIGINAL"):
        raise SystemExit("the original case needs DITI_ORIGINAL=/path/to/an/extracted/copy/of/diti")
    args.work.mkdir(parents=True, exist_ok=True)
    # The commit that runs, read before any work (the tree may change during a long run).
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    t0 = time.perf_counter()
    prepare(args)
    timings = {"prepare_s": time.perf_counter() - t0}
    results = {}
    # --parallel: every case at once, one process each (on a machine with a core per case; the
    # statistic does not depend on speed, only the timings do).
    groups = [cases] if args.parallel else [[c] for c in cases]
    for group in groups:
        t = time.perf_counter()
        procs = {c: start_case(args, c) for c in group}
        for case, proc in procs.items():
            results[case] = finish_case(args, case, proc)
            timings[f"{case}_s"] = time.perf_counter() - t
            print(f"{case}: done in {timings[f'{case}_s']:.0f} s", flush=True)
    base = bucket_table(results["fp32"]["loss_t"])
    comparisons = {c: ratio_intervals(bucket_table(results[c]["loss_t"]), base, paired=True)
                   for c in cases if c != "fp32"}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, comparisons, args.out / "parity.png")
    summary = {"command": "python benchmarks/parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "commit": commit, "steps": args.steps, "last_steps": LAST, "batch": BATCH, "threads": args.threads,
               "image_size": args.image_size, "ddpm_steps": args.ddpm_steps if args.ddpm is None else None,
               "ddpm": str(ddpm_dir(args)), "data": str(data_dir(args)), "parallel": args.parallel,
               "timings": timings,
               "comparisons": {c: {"paired": True, "buckets": ivs, "within_5_percent": within(ivs)}
                               for c, ivs in comparisons.items()},
               "final_losses": {c: float(np.mean(r["loss"][-LAST:])) for c, r in results.items()}}
    (args.out / "parity.json").write_text(json.dumps(summary, indent=1))
    for c, s in summary["comparisons"].items():
        print(f"{c} / fp32 per t-bucket: " + ", ".join(f"{iv['ratio']:.5f} [{iv['lo']:.5f}, {iv['hi']:.5f}]"
                                                      for iv in s["buckets"]) + f"; within 5%: {s['within_5_percent']}")
    return 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.exit(main())
