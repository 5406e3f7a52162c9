"""Training-step throughput (images/s) and peak memory of the whole engine (pytest-benchmark).

    pytest benchmarks/bench_engine.py --benchmark-enable --benchmark-only -s
    DITI_ORIGINAL=/tmp/diti_orig pytest benchmarks/bench_engine.py ... -s   # + the original code
    python benchmarks/bench_engine.py [--cases eager,compiled,original] [--steps 12] [--threads 1]

Every case runs in its own process (clean peak memory, no shared compile caches) and trains with
``data.source=fixed`` (one in-memory batch, no loader), so only the step is measured:

* CPU, ``eager`` / ``compiled``: ``diti_fast/train.py`` itself (DeepSpeed, EMA, metrics, all of
  it) on the bench configuration below, torch.compile off / on. images/s is the steady state after
  the warm-up steps (the compile time is reported separately as the first interval).
* CPU, ``original`` (only when ``DITI_ORIGINAL`` points at an extracted copy of
  github.com/yue-zhongqi/diti, which is never part of this repository): the original's modules
  (ShiftUNet, CELEBA64Encoder, GaussianDiffusion.pdae_timestep_loss) on the same configuration,
  stepped the way its trainer steps them: forward, ``loss.item()``, backward, torch Adam, the
  per-parameter EMA loop. Its training script needs CUDA + DDP, so only the step is timed. It starts
  from the same weights as ``eager`` and sees the same fixed batch and the same t and ε per step
  (its own draws are replaced by the engine's), so the two loss curves differ only by the
  implementations' rounding: the table's loss comparison is like against like.
* CUDA: the celeba64 preset against ``celeba64_original`` (fp32, eager, math attention, unfused),
  200 steps each, loss curves compared (benchmarks/gpu_check.py runs the same pair on a GPU
  machine and writes the docs table).

CPU bench configuration: the celeba64 preset's encoder, masks and 64 px images, with the demo's
small UNet (base 32, mult 1,2,2, one res block; the 64-px UNet of the preset takes seconds per
image on a laptop-class CPU), global batch 8, fp32, one process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_MODEL = ["model.unet.base_channel=32", "model.unet.channel_multiplier=[1,2,2]",
             "model.unet.num_residual_blocks_of_a_block=1", "model.unet.attention_resolutions=[4]"]
CPU_BATCH = 8
WARMUP = 3


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def case_overrides(case: str, steps: int, batch: int, run_dir: Path, ddpm: Path, threads: int) -> tuple[str, list]:
    common = ["data.source=fixed", f"data.batch_size={batch}", f"run.max_images={steps * batch}",
              f"init.ddpm={ddpm}", f"run.dir={run_dir}", "log.progress=false",
              "log.tensorboard=false", "checkpoint.every=0", "checkpoint.on_signal=false"]
    if case in ("eager", "compiled"):
        # One process, as the original's step is timed: no ZeRO partitioning, lr as given.
        return "celeba64", common + CPU_MODEL + [
            "log.every=1", "optim.lr_rule=none", "deepspeed.zero_stage=0",
            "run.device=cpu", "run.precision=fp32", f"run.threads={threads}", "fast.attention=sdpa",
            "fast.fused_norm=false", "fast.fused_loss=false", f"fast.compile={case == 'compiled'}"]
    if case == "gpu_original":  # the presets as they are (ZeRO-2, lr rule), as benchmarks/gpu_check.py runs them
        return "celeba64_original", common + ["log.every=10", "run.device=cuda"]
    if case == "gpu_preset":
        return "celeba64", common + ["log.every=10", "run.device=cuda"]
    raise ValueError(case)


def _ddpm_export(config: str, overrides: list[str], path: Path) -> Path:
    """A frozen DDPM with random weights (speed does not depend on them), zero-init output convs
    perturbed so the frozen trunk's numerics reach the loss."""
    import torch
    from diti_fast.weights import save_export
    from diti_fast.nn import build_unet
    from diti_fast.engine.config_files import load_config, resolved_dict
    cfg = load_config(config, ["stage=ddpm", "data.source=fixed", *overrides])
    torch.manual_seed(0)
    unet = build_unet(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return save_export(path, "ddpm", cfg.model, resolved_dict(cfg), unet=unet)


def _steady(records: list[dict], warmup: int) -> dict:
    recs = [r for r in records if r.get("images_per_s")]
    prev, intervals = 0, []
    for r in recs:
        img = r["images"] - prev
        intervals.append((r["step"], img, img / r["images_per_s"]))
        prev = r["images"]
    steady = [i for i in intervals if i[0] > warmup] or intervals
    return {"images_per_s": sum(i[1] for i in steady) / sum(i[2] for i in steady),
            "first_step_s": intervals[0][2] if intervals else None,
            "peak_memory_bytes": max(r.get("peak_memory_bytes") or 0 for r in recs),
            "loss_curve": [[r["step"], r["loss"]] for r in recs]}


# --------------------------------------------------------------------------- workers (subprocesses)

def worker_ours(case: str, steps: int, threads: int, out: Path) -> None:
    from diti_fast.engine.loop import train
    from diti_fast.engine.config_files import load_config
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, over = case_overrides(case, steps, CPU_BATCH if case in ("eager", "compiled") else 128,
                                      tmp / "run", tmp / "ddpm.safetensors", threads)
        model_over = CPU_MODEL if case in ("eager", "compiled") else []
        _ddpm_export(config, model_over, tmp / "ddpm.safetensors")
        t0 = time.perf_counter()
        train(load_config(config, over))
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    res = dict(_steady(recs, WARMUP if case != "gpu_preset" and case != "gpu_original" else 50),
               case=case, steps=steps, wall_s=wall)
    out.write_text(json.dumps(res))


class _SameDraws:
    """Inside the block, torch.randint / torch.randn / torch.randn_like hand out the given t and ε
    (the engine's own draws for these samples) when asked for their shape, so the original's loss,
    which draws t and ε itself, sees exactly what our engine sees. Both must be taken, or the
    comparison would be between unrelated draws: __exit__ says so."""

    def __init__(self, t, eps):
        import torch
        self.torch, self.t, self.eps, self.used = torch, t, eps, set()

    def __enter__(self):
        torch, real = self.torch, (self.torch.randint, self.torch.randn, self.torch.randn_like)
        self.real = real

        def randint(*args, **kw):
            size = kw.get("size", args[-1] if args else None)
            if size is not None and tuple(size) == tuple(self.t.shape):
                self.used.add("t")
                return self.t.clone().to(kw.get("device") or self.t.device)
            return real[0](*args, **kw)

        def randn(*size, **kw):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            if shape == tuple(self.eps.shape):
                self.used.add("eps")
                return self.eps.clone()
            return real[1](*size, **kw)

        def randn_like(x, **kw):
            if tuple(x.shape) == tuple(self.eps.shape):
                self.used.add("eps")
                return self.eps.clone().to(x.dtype)
            return real[2](x, **kw)

        torch.randint, torch.randn, torch.randn_like = randint, randn, randn_like
        return self

    def __exit__(self, *exc):
        self.torch.randint, self.torch.randn, self.torch.randn_like = self.real
        if exc[0] is None and self.used != {"t", "eps"}:
            raise RuntimeError(f"the original's loss did not draw {sorted({'t', 'eps'} - self.used)} through "
                               "torch.randint/randn/randn_like: cannot give it the engine's draws")


def worker_original(steps: int, threads: int, out: Path) -> None:
    """The original's modules and step on the CPU bench configuration (see the module docstring),
    fed like against like with the ``eager`` case: the same initial weights (our Objective built with
    the run's seed and frozen DDPM, copied into the original's modules, whose parameter names are
    the same), the same fixed batch x0, and per step the same t and ε (our index-keyed draws)."""
    import torch
    root = os.environ["DITI_ORIGINAL"]
    sys.path.insert(0, root)
    from model.diffusion import GaussianDiffusion
    from model.representation.encoder.celeba64 import CELEBA64Encoder
    from model.unet import ShiftUNet

    from diti_fast.config import to_dict
    from diti_fast.engine import noise
    from diti_fast.engine.microbatches import fixed_batch, to_model_input
    from diti_fast.engine.objective import Objective, load_frozen_ddpm
    from diti_fast.engine.config_files import load_config
    from diti_fast.masks import TimestepMasks
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, over = case_overrides("eager", steps, CPU_BATCH, tmp / "run", tmp / "ddpm.safetensors", threads)
        _ddpm_export(config, CPU_MODEL, tmp / "ddpm.safetensors")
        cfg = load_config(config, over)
        torch.manual_seed(cfg.run.seed)  # as the engine does right before building its models
        ours = Objective(cfg, torch.device("cpu"), autocast=False)
        load_frozen_ddpm(ours.decoder, cfg)
    u = cfg.model.unet
    encoder = CELEBA64Encoder(latent_dim=u.latent_dim)
    decoder = ShiftUNet(**{**to_dict(u), "channel_multiplier": tuple(u.channel_multiplier),
                           "attention_resolutions": tuple(u.attention_resolutions)})
    encoder.load_state_dict(ours.encoder.state_dict())
    decoder.load_state_dict(ours.decoder.state_dict())
    for name in ("time_embed", "input_blocks", "middle_block", "output_blocks", "out"):
        getattr(decoder, name).requires_grad_(False)
    ema_enc = [p.detach().clone() for p in encoder.parameters()]
    ema_dec = [p.detach().clone() for p in decoder.parameters()]
    params = [p for p in list(encoder.parameters()) + list(decoder.parameters()) if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    diffusion = GaussianDiffusion(to_dict(cfg.model.diffusion), device="cpu")
    masks = TimestepMasks.build(cfg.model.masks, u.latent_dim, cfg.model.diffusion.timesteps)
    tables, t_to_idx = masks.tables(), masks.t_to_idx
    x0 = to_model_input(fixed_batch(cfg, 64), "cpu")
    decay = cfg.ema.decay
    times, losses = [], []
    for step in range(steps):
        index = torch.arange(step * CPU_BATCH, (step + 1) * CPU_BATCH)
        t, eps = noise.draw(cfg.run.seed, index, tuple(x0.shape[1:]), cfg.model.diffusion.timesteps)
        t0 = time.perf_counter()
        encoder.train()
        decoder.set_train_mode()
        opt.zero_grad()
        with _SameDraws(t, eps):
            loss, _, _ = diffusion.pdae_timestep_loss(encoder, decoder, x0, t_to_idx, tables["masks"],
                                                      tables["k_masks"], tables["receding_masks"], "base")
        losses.append(loss.item())  # the original logs the loss every step
        loss.backward()
        opt.step()
        with torch.no_grad():  # the original's EMA: one mul_/add_ pair per trainable parameter
            for ema, p in zip(ema_enc + ema_dec, list(encoder.parameters()) + list(decoder.parameters())):
                if p.requires_grad:
                    ema.mul_(decay).add_(p, alpha=1 - decay)
        times.append(time.perf_counter() - t0)
    steady = times[WARMUP:] or times
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps({"case": "original", "steps": steps, "images_per_s": CPU_BATCH * len(steady) / sum(steady),
                               "first_step_s": times[0], "peak_memory_bytes": rss,
                               "loss_curve": [[i + 1, v] for i, v in enumerate(losses)]}))


def run_case(case: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cpu" if not case.startswith("gpu") else "cuda")
        env.pop("TRITON_INTERPRET", None)  # the CPU runs use the eager reference paths, not the interpreter
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--steps", str(steps),
               "--threads", str(threads), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{case} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- pytest-benchmark

_RESULTS: dict[str, dict] = {}
CPU_CASES = ["original", "eager", "compiled"]
GPU_CASES = ["gpu_original", "gpu_preset"]


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if _RESULTS:
        print("\n" + table(_RESULTS))


@pytest.mark.parametrize("case", GPU_CASES if _cuda() else CPU_CASES)
def test_engine_step(benchmark, case):
    if case == "original" and not os.environ.get("DITI_ORIGINAL"):
        pytest.skip("set DITI_ORIGINAL to an extracted copy of the original DiTi code to compare with it")
    steps = 200 if case.startswith("gpu") else 12
    res = benchmark.pedantic(run_case, args=(case, steps, int(os.environ.get("BENCH_THREADS", 0))),
                             rounds=1, iterations=1)
    _RESULTS[case] = res
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "loss_curve"})
    assert math.isfinite(res["images_per_s"]) and res["images_per_s"] > 0


def table(results: dict[str, dict]) -> str:
    base = results.get("original") or results.get("gpu_original")
    lines = ["case            images/s   x original   peak memory   first step (s)   last loss"]
    for case, r in results.items():
        x = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        last = r["loss_curve"][-1][1] if r.get("loss_curve") else float("nan")
        lines.append(f"{case:<14} {r['images_per_s']:>9.2f} {x:>12} {r['peak_memory_bytes'] / 2**20:>10.0f} MiB "
                     f"{r['first_step_s'] or 0:>14.2f} {last:>11.4f}")
    if base and len(results) > 1:
        # Loss curves: mean over the second half of the logged steps, each case against the baseline.
        def late_mean(r):
            curve = [v for s, v in r["loss_curve"] if s > r["loss_curve"][-1][0] / 2 and math.isfinite(v)]
            return sum(curve) / len(curve) if curve else float("nan")
        b = late_mean(base)
        for case, r in results.items():
            if r is not base:
                lines.append(f"{case}: late-half mean loss {late_mean(r):.4f} vs baseline {b:.4f} "
                             f"({abs(late_mean(r) - b) / b:.1%} apart)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cases", default=None, help="comma-separated: original, eager, compiled (CPU); "
                    "gpu_original, gpu_preset (CUDA)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)
    if args.worker:
        steps = args.steps or (200 if args.worker.startswith("gpu") else 12)
        if args.worker == "original":
            worker_original(steps, args.threads, args.out)
        else:
            worker_ours(args.worker, steps, args.threads, args.out)
        return 0
    cases = args.cases.split(",") if args.cases else (GPU_CASES if _cuda() else
                                                     [c for c in CPU_CASES if c != "original" or os.environ.get("DITI_ORIGINAL")])
    results = {}
    for case in cases:
        steps = args.steps or (200 if case.startswith("gpu") else 12)
        results[case] = run_case(case, steps, args.threads)
        print(f"{case}: {results[case]['images_per_s']:.2f} images/s", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.exit(main())
