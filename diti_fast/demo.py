"""The CPU demo behind ``make demo``: synthetic shards -> DDPM -> DiTi -> EMA export -> report.

    python -m diti_fast.demo [--out runs/demo] [--ddpm-images N] [--diti-images N] [--fresh]

Everything lands under ``runs/demo``: ``data/train`` and ``data/eval`` (shards, made if absent),
``ddpm/`` and ``diti/`` (run directories: config.yaml, metrics.jsonl, checkpoints/, export/), and
``diti/report/`` (the evaluation report of the DiTi export on the held-out shards). Sized
for 15 minutes on 2 CPU cores: each training stage also has a wall-clock budget, so a slower
machine trains on fewer images instead of overrunning (it then says so). A stage whose export
exists is skipped; ``--fresh`` starts over.
"""
from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: idle threads sleep instead of spinning. On a machine
# shared with other processes, spinning OpenMP threads slow a 2-thread step down several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from data_shards.synthetic import make_synthetic_shards  # noqa: E402
from diti_fast.engine.config_files import load_config  # noqa: E402
from diti_fast.engine.loop import train  # noqa: E402
from diti_fast.eval.report import write_report  # noqa: E402
from diti_fast.weights import export_path  # noqa: E402

# Lengths in images as every run; the minute caps govern on a slow machine. Measured on 2 cores:
# see docs/training.md (the demo section) for the timings these were chosen from.
DEFAULTS = dict(train_samples=10000, eval_samples=4000, ddpm_images=9600, diti_images=6400,
                ddpm_minutes=5.5, diti_minutes=5.5)


def _make_shards(out: Path, num: int, seed: int) -> None:
    if (out / "manifest.json").is_file():
        print(f"[demo] shards {out} exist ({num} requested; reusing)", flush=True)
        return
    print(f"[demo] making {num} synthetic 32x32 samples (seed {seed}) in {out}", flush=True)
    make_synthetic_shards(out, num, image_size=32, seed=seed, maxcount=2000, workers=os.cpu_count() or 1,
                          progress=True)


def _last_loss(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def _stage(name: str, overrides: list[str], run: Path, minutes: float, fresh: bool):
    if export_path(run).is_file() and not fresh:
        print(f"[demo] {name}: {export_path(run)} exists, skipping (--fresh to retrain)", flush=True)
        return None
    cfg = load_config("shapes32", overrides + [f"run.dir={run}", f"run.time_limit_minutes={minutes}"])
    res = train(cfg)
    if res.status == "time_limit":
        print(f"[demo] {name}: wall-clock budget of {minutes:g} min reached after {res.step} of "
              f"{cfg.total_steps()} steps (a slower machine); continuing with what was learnt", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diti_fast.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--train-samples", type=int, default=DEFAULTS["train_samples"])
    ap.add_argument("--eval-samples", type=int, default=DEFAULTS["eval_samples"])
    ap.add_argument("--ddpm-images", type=int, default=DEFAULTS["ddpm_images"], help="DDPM training length")
    ap.add_argument("--diti-images", type=int, default=DEFAULTS["diti_images"], help="DiTi training length")
    ap.add_argument("--ddpm-minutes", type=float, default=DEFAULTS["ddpm_minutes"], help="wall-clock cap")
    ap.add_argument("--diti-minutes", type=float, default=DEFAULTS["diti_minutes"], help="wall-clock cap")
    ap.add_argument("--device", default="cpu", choices=("cpu", "auto", "cuda"))
    ap.add_argument("--fresh", action="store_true", help="delete earlier demo runs (not the shards) first")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    out = args.out
    ddpm_run, diti_run = out / "ddpm", out / "diti"
    if args.fresh:
        for d in (ddpm_run, diti_run):
            shutil.rmtree(d, ignore_errors=True)
    train_shards, eval_shards = out / "data" / "train", out / "data" / "eval"
    _make_shards(train_shards, args.train_samples, seed=0)
    _make_shards(eval_shards, args.eval_samples, seed=1)
    times = {"shards": time.perf_counter() - t0}

    common = [f"data.shards={train_shards}", f"run.device={args.device}"]
    t = time.perf_counter()
    _stage("ddpm", common + ["stage=ddpm", f"run.max_images={args.ddpm_images}"], ddpm_run,
           args.ddpm_minutes, args.fresh)
    times["ddpm"] = time.perf_counter() - t
    t = time.perf_counter()
    _stage("diti", common + [f"init.ddpm={ddpm_run}", f"run.max_images={args.diti_images}"], diti_run,
           args.diti_minutes, args.fresh)
    times["diti"] = time.perf_counter() - t

    t = time.perf_counter()
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    print(f"[demo] evaluation report on {eval_shards}", flush=True)
    report = write_report(diti_run, eval_shards, device)
    times["report"] = time.perf_counter() - t

    times["total"] = time.perf_counter() - t0
    print("\n[demo] summary")
    for name, run in (("ddpm", ddpm_run), ("diti", diti_run)):
        print(f"  {name}: last logged loss {_last_loss(run)}, export {run / 'export' / 'ema.safetensors'}")
    print(f"  report: {report}")
    print("  time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
