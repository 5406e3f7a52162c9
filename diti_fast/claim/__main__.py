"""``python -m diti_fast.claim [--smoke] [--work DIR] [--results DIR] [--threads N] [--fresh]`` (``make claim``).

Resumable: every phase is skipped when its output exists and training resumes from its checkpoints,
so an interrupted run continues where it stopped when the same command is run again. The full plan
writes benchmarks/results/claim/; the smoke plan writes WORK/results/ so that it never overwrites
committed results.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (matters on a machine shared with other processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
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
    ap.add_argument("--smoke", action="store_true", help="every phase on tiny sizes (seconds): proves the pipeline")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default runs/claim[-smoke])")
    ap.add_argument("--results", type=Path, default=None,
                    help="where JSON, plots and the report go (default benchmarks/results/claim; smoke: WORK/results)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    args = ap.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv

    # lazy: torch and the pipeline load after the arguments are parsed (--help and usage errors stay instant)
    import torch
    from . import pipeline as P
    from .report import plots, write_markdown

    git = git_state()  # what runs: read before any work (the tree may change while the run goes on)
    load_start = os.getloadavg()
    plan = PLANS["smoke" if args.smoke else "full"]
    work = args.work or Path("runs") / ("claim-smoke" if args.smoke else "claim")
    results = args.results or (work / "results" if args.smoke else REPO / "benchmarks" / "results" / "claim")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = P.Context(plan, work, threads=args.threads)
    t0 = time.perf_counter()
    P.log(f"plan {plan.name}: work {work}, results {results}, {torch.get_num_threads()} torch threads, "
          f"load average {load_start[0]:.2f}")

    data = P.timed(ctx, "data", P.phase_data, ctx)
    design = P.timed(ctx, "design", P.phase_design, ctx)
    for name, row in design["factors"].items():
        P.log(f"  {name:11s} lost at t p10/p50/p90 = {row['lost_t_p10']:.0f}/{row['lost_t_p50']:.0f}/"
              f"{row['lost_t_p90']:.0f} (stage {row['lost_stage']}, {row['scale']} scale)")
    probe = P.timed(ctx, "probe", P.phase_probe, ctx)
    choice = probe["chosen"]
    ddpm = P.timed(ctx, "ddpm", P.phase_ddpm, ctx, choice)
    ddpm_gate = P.timed(ctx, "ddpm_gate", P.phase_ddpm_gate, ctx)
    P.log(f"ddpm gate: denoiser {'pass' if ddpm_gate['denoiser']['pass'] else 'FAIL'} "
          f"(excess below t=500 {[round(e, 4) for e in ddpm_gate['denoiser']['excess_below_500']]}), samples "
          f"{'pass' if ddpm_gate['samples']['pass'] else 'FAIL'} (valid {ddpm_gate['samples']['valid_fraction']:.2f})")

    # The first arm run sets the length of all others: the same number of images for every arm and seed.
    first_arm, first_seed = plan.arms[0], plan.seeds[0]
    arms = {(first_arm, first_seed): P.timed(ctx, P.arm_name(first_arm, first_seed), P.phase_arm, ctx,
                                             first_arm, first_seed, choice, plan.arm_images)}
    images = plan.arm_images or arms[(first_arm, first_seed)]["images"]
    for a in plan.arms:
        for s in plan.seeds:
            if (a, s) not in arms:
                arms[(a, s)] = P.timed(ctx, P.arm_name(a, s), P.phase_arm, ctx, a, s, choice, images)
    measured = {k: P.timed(ctx, f"measure_{P.arm_name(*k)}", P.phase_measure, ctx, *k) for k in arms}
    for (a, s), (m, _) in measured.items():
        P.log(f"{P.arm_name(a, s)}: held-out loss {m['losses']['own']['loss']:.5f}, z shuffled "
              f"+{m['losses']['shuffle_increase']:.1%}, DDPM alone {m['losses']['ddpm_only']['loss']:.5f}")
    t = time.perf_counter()
    decision = P.analysis(ctx, design, ddpm_gate, measured)
    ctx.timings["analysis"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "ddpm_samples.png", results / "ddpm_samples.png")
    ctx.timings["total"] = round(time.perf_counter() - t0, 2)
    cmd = "python -m diti_fast.claim " + " ".join(shlex.quote(a) for a in argv_used)
    result = {
        "command": cmd.strip(), "via_make": bool(os.environ.get("CLAIM_FROM_MAKE")), "git": git,
        "plan": plan.to_json(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "timings_s": ctx.timings, "data": data, "design": design, "probe": probe, "ddpm": ddpm,
        "ddpm_gate": ddpm_gate, "arms": {P.arm_name(*k): v for k, v in arms.items()},
        "measured": {P.arm_name(*k): v[0] for k, v in measured.items()}, **decision,
    }
    launches_file = work / "launches.jsonl"
    with open(launches_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "command": cmd.strip(), "timings_s": ctx.timings}) + "\n")
    result["launches"] = [json.loads(x) for x in launches_file.read_text().splitlines() if x.strip()]
    plots(result, work, results)
    ctx.timings["report"] = round(time.perf_counter() - t, 2)
    P.write_json(results / "claim.json", result)
    write_markdown(result, results / "claim.md")
    P.log(f"done in {ctx.timings['total'] / 60:.1f} min: {results / 'claim.md'}")
    P.log(f"verdict ({P.PRIMARY} vs {P.BASELINE}): {result['verdict']}: {result['verdicts'][P.PRIMARY]['why']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
