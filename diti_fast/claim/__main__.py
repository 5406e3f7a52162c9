"""``python -m diti_fast.claim [--smoke] [--work DIR] [--results DIR] [--threads N]`` (what `make claim` runs).

Resumable: every phase is skipped when its outputs exist, and training resumes from its checkpoints,
so an interrupted run continues where it stopped when the same command is run again. ``--fresh``
deletes the work directory first. The full plan writes benchmarks/results/claim/; the smoke plan
writes runs/claim-smoke/results/ so that it never overwrites committed results.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (matters on a machine shared with other processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .plan import PLANS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diti_fast.claim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every phase on tiny sizes (~1-2 min): proves the pipeline")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default runs/claim[-smoke])")
    ap.add_argument("--results", type=Path, default=None,
                    help="where JSON, plots and the reading go (default benchmarks/results/claim, "
                         "smoke: WORK/results)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    ap.add_argument("--diti-images", type=int, default=0,
                    help="train DiTi and PDAE for this many images each instead of the plan's (a longer "
                         "supplementary run: give it its own --work and --results)")
    args = ap.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv

    import torch
    from . import pipeline as P
    from .attribution import finite_tree
    from .reading import plot_fine_vs_coarse, plot_losses, plot_onset_curves, reading, write_markdown

    git = git_state()  # what runs: read before any work (the tree may change while the run goes on)
    plan = PLANS["smoke" if args.smoke else "full"]
    if args.diti_images:
        plan = dataclasses.replace(plan, name=f"{plan.name}, diti_images={args.diti_images}",
                                   diti_images=args.diti_images)
    work = args.work or Path("runs") / ("claim-smoke" if args.smoke else "claim")
    results = args.results or (work / "results" if args.smoke else REPO / "benchmarks" / "results" / "claim")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = P.Context(plan, work, threads=args.threads)
    t0 = time.perf_counter()
    P.log(f"plan {plan.name}: work {work}, results {results}, {torch.get_num_threads()} torch threads")

    data = {"factors": P.timed(ctx, "shards", P.phase_shards, ctx)}
    ddpm = P.timed(ctx, "ddpm", P.phase_ddpm, ctx)
    encoders = {name: P.timed(ctx, name, P.phase_encoder, ctx, name) for name in P.ENCODERS}
    attribution = {name: P.timed(ctx, f"attribution_{name}", P.phase_attribution, ctx, name) for name in P.ENCODERS}
    judge = None
    if not all((work / "grids" / f"{n}.json").is_file() for n in P.ENCODERS):
        judge, _ = P._judge(ctx)
    grids = {name: P.timed(ctx, f"grids_{name}", P.phase_grids, ctx, name, judge) for name in P.ENCODERS}

    t = time.perf_counter()
    results.mkdir(parents=True, exist_ok=True)
    for name in P.ENCODERS:
        shutil.copyfile(work / "grids" / f"counterfactuals_{name}.png", results / f"counterfactuals_{name}.png")
    shutil.copyfile(work / "ddpm" / f"samples-{ddpm['images']:08d}.png", results / "ddpm_samples.png")
    plot_onset_curves(work, attribution, results / "onset_curves.png")
    plot_fine_vs_coarse(attribution, results / "fine_vs_coarse.png")
    plot_losses(work, results / "losses.png")
    ctx.timings["report"] = round(time.perf_counter() - t, 2)
    ctx.timings["total"] = round(time.perf_counter() - t0, 2)
    cmd = "python -m diti_fast.claim " + " ".join(shlex.quote(a) for a in argv_used)
    result = {
        "command": cmd.strip(), "via_make": bool(os.environ.get("CLAIM_FROM_MAKE")), "git": git,
        "plan": plan.to_json(),
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "timings_s": ctx.timings, "data": data, "ddpm": ddpm, "encoders": encoders,
        "attribution": {k: {kk: vv for kk, vv in v.items() if kk != "point"} for k, v in attribution.items()},
        "grids": grids,
    }
    # Timings of earlier launches of this work directory (an interrupted run resumed): per phase, the
    # sum over launches is the phase's whole cost; this launch's own numbers are in timings_s.
    launches_file = work / "launches.jsonl"
    with open(launches_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "command": cmd.strip(), "timings_s": ctx.timings}) + "\n")
    launches = [json.loads(line) for line in launches_file.read_text().splitlines() if line.strip()]
    result["launches"] = launches
    result["timings_all_launches_s"] = {k: round(sum(la["timings_s"].get(k, 0.0) for la in launches), 2)
                                        for k in ctx.timings}
    result["reading"] = reading(result)
    P.write_json(results / "claim.json", result)
    write_markdown(result, results / "claim.md")
    if not finite_tree(P.read_json(results / "claim.json")):
        P.log("warning: claim.json holds a non-finite number")
    P.log(f"done in {ctx.timings['total'] / 60:.1f} min: {results / 'claim.md'}")
    for line in result["reading"]:
        P.log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
