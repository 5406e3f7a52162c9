#!/usr/bin/env python3
"""One prepared run on one GPU that measures everything the performance claims rest on.

    bash benchmarks/gpu_check.sh                 # on the GPU machine (installs .whl/ if present)
    python benchmarks/gpu_check.py --dry-run     # any machine: the plan and the environment check
    python benchmarks/gpu_check.py --out DIR     # results into DIR (default: $OUT if set, else
                                                 # benchmarks/results/<date>-<device>/)

Phases, in order, each a separate process group with its own time limit (unused time carries
forward, so the whole run ends inside ``--budget`` seconds, 450 by default, even if a phase hangs):

1. ``env``          what is installed, where ``diti_fast`` and ``diti_fast.kernels`` come from  -> env.json
2. ``ceilings``     device-to-device copy bandwidth and bf16 / tf32 / fp32 matmul rates        -> ceilings.json
3. ``kernel_tests`` the kernel test files, compiled (TRITON_INTERPRET unset)                    -> kernel_tests.json
4. ``bench``        the kernel, loss, attention and masked-latent benchmarks (pytest-benchmark) -> bench_kernels.json
5. ``engine``       200 steps of the celeba64 preset and of the original's configuration on
                    synthetic in-memory data (train.py, one process)                            -> engine.json

then ``summary.md`` (phases and every goal, met or not) and ``log.txt`` (all phase output): 7 files,
inside the 8 a device run may bring back. ``benchmarks/plot_results.py`` turns a results directory
into figures and the table of ``docs/performance.md``.

The package need not be installed: ``diti_fast`` is imported from this checkout (its root goes on
PYTHONPATH) and ``kernels/``, which only the editable install maps to ``diti_fast.kernels``, is
mapped by a generated ``sitecustomize.py`` (a meta-path finder for that one name) in a temporary
directory that also goes on PYTHONPATH of every child process, so pytest, train.py and Inductor's
compile workers all see it. It chains to any sitecustomize it shadows.

This parent process never imports torch: a hung CUDA call can only take a child down with it.

Code map (``benchmarks/gpucheck/``, one module per concern): ``settings`` (budgets, files, goals),
``children`` (the import shim, child environments, process groups with time limits), one module
per phase (``environment``, ``ceilings``, ``kernel_tests``, ``bench``, ``engine``: the worker that
runs in the child and ``run_phase``, the parent's side), and ``results`` (the analysis of a
results directory, shared with ``plot_results.py``). This file: the command line, the plan, the
phase sequence and time budget, ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpucheck/ beside this script; no install needed
from gpucheck import bench, ceilings, engine, environment, kernel_tests, sweep  # noqa: E402
from gpucheck.children import ChildResult, _terminate_children, child_env, run_child, write_shim  # noqa: E402
from gpucheck.engine import engine_overrides  # noqa: E402
from gpucheck.environment import device_slug, env_report_lines, missing_for  # noqa: E402
from gpucheck.results import goal_rows, load_json, load_results, rows_to_markdown  # noqa: E402
from gpucheck.settings import (BENCH_ARGS, BENCH_FILES, DEFAULT_BUDGET, ENGINE_FAST_CONFIG,  # noqa: E402
                               ENGINE_ORIGINAL_CONFIG, ENGINE_STEPS, ENV_TIMEOUT_S, KERNEL_TESTS, LOG_CAP_BYTES,
                               PACKAGES, PHASE_BUDGETS, REPO, SWEEP_BATCHES)

SELF = Path(__file__).resolve()
PHASES = {"ceilings": ceilings, "kernel_tests": kernel_tests, "bench": bench, "engine": engine, "sweep": sweep}


def worker_cmd(name: str, *args: str) -> list[str]:
    """The command line of a phase's child: this script again, in worker mode."""
    return [sys.executable, str(SELF), "--worker", name, *args]


def phase_budgets(args) -> dict[str, float]:
    """Seconds per selected phase (env always), scaled so that they add up to --budget."""
    sel = ["env"] + [p for p in PHASE_BUDGETS if p in args.phases and p != "env"]
    total = sum(PHASE_BUDGETS[p] for p in sel)
    return {p: PHASE_BUDGETS[p] * args.budget / total for p in sel}


def plan_lines(args, out_desc: str) -> list[str]:
    tests = [t for t in KERNEL_TESTS if (REPO / t).is_file()]
    benches = [b for b in BENCH_FILES if (REPO / b).is_file()]
    b = phase_budgets(args)
    lines = [f"output directory: {out_desc}",
             f"time budget: {args.budget:.0f} s in all; per phase (unused time carries forward): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in b.items()),
             f"1. env          -> env.json           packages, CUDA device, import origins (shim: "
             f"diti_fast.kernels -> {REPO / 'kernels'})",
             "2. ceilings     -> ceilings.json      copy bandwidth (benchmarks/conftest.py), 8192³ matmul bf16/tf32/fp32",
             f"3. kernel_tests -> kernel_tests.json  python -m pytest -v {' '.join(tests)}"
             + (f" -n {args.test_workers} (if pytest-xdist)" if args.test_workers else "")
             + " (TRITON_INTERPRET unset: compiled)",
             f"4. bench        -> bench_kernels.json one pytest run per file: {' '.join(benches)} "
             f"{' '.join(BENCH_ARGS)}",
             f"5. engine       -> engine.json        random-weight celeba64 DDPM export, then {args.engine_steps} "
             f"steps each of python diti_fast/train.py --config {args.engine_original_config} / "
             f"--config {args.engine_fast_config} / --config {args.engine_fast_config} run.precision=fp32 with "
             + " ".join(engine_overrides(args.engine_steps, args.engine_batch or 128, Path("<tmp>/run-NAME"),
                                         Path("<tmp>/ddpm/ema.safetensors"), "cuda", args.engine_extra)),
             f"6. sweep        -> sweep.json         the engine's step (GraphStep) of {args.engine_fast_config} at "
             f"per-GPU batch {', '.join(map(str, SWEEP_BATCHES))}, with/without CUDA graph and channels_last, "
             "images/s and model FLOPs per image (MFU against the bf16 matmul ceiling)",
             "then summary.md (phases + goals) and log.txt (all output): 8 files",
             ]
    if not (REPO / "benchmarks/bench_engine.py").is_file():
        lines.append("note: benchmarks/bench_engine.py does not exist; the engine phase drives train.py itself")
    return lines


def _capped(text: str, cap: int = LOG_CAP_BYTES) -> str:
    if len(text) <= cap:
        return text
    half = cap // 2
    return text[:half] + f"\n[... {len(text) - cap} characters elided ...]\n" + text[-half:]


class Run:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.shim = write_shim(self.tmp / "shim")
        self.out: Path | None = None
        self.env_info: dict | None = None
        self.phases: dict[str, dict] = {}
        self.started = time.time()
        self.deadline = self.started + args.budget
        self.budgets = phase_budgets(args)
        self.slack = 0.0
        self.command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(
            ["python", str(SELF.relative_to(REPO)), *sys.argv[1:]])

    worker_cmd = staticmethod(worker_cmd)

    def env(self, extra: dict | None = None) -> dict:
        cuda = None if self.env_info is None else bool(self.env_info.get("cuda"))
        return child_env(self.shim, cuda, extra)

    def log(self, phase: str) -> Path:
        return self.tmp / f"{phase}.log"

    def limit(self, phase: str) -> float:
        """This phase's budget, plus what earlier phases left unused, never past the deadline
        minus the budgets of the phases still to come."""
        names = list(self.budgets)
        later = sum(self.budgets[n] for n in names[names.index(phase) + 1:])
        own = self.budgets[phase] + self.slack
        return max(0.0, min(own, self.deadline - time.time() - later))

    def record(self, phase: str, res: ChildResult, limit: float, budget: float | None = None, **extra) -> None:
        self.phases[phase] = {"status": res.status, "returncode": res.returncode, "wall_s": round(res.wall_s, 1),
                              "limit_s": round(limit, 1), **extra}
        # What this phase left of its own share goes to the next one.
        self.slack = max(0.0, (limit if budget is None else budget) - res.wall_s)
        print(f"[gpu_check] {phase}: {res.status} in {res.wall_s:.0f} s (limit {limit:.0f} s)", flush=True)
        if res.status not in ("ok", "skipped"):
            tail = self.log(phase).read_text(errors="replace").splitlines()[-25:] if self.log(phase).exists() else []
            print("\n".join("    " + ln for ln in tail), flush=True)

    def skip(self, phase: str, why: str) -> None:
        self.phases[phase] = {"status": "skipped", "reason": why}
        self.slack += self.budgets.get(phase, 0.0)  # its time goes to the next phase
        print(f"[gpu_check] {phase}: skipped ({why})", flush=True)

    # -- phases
    def run_env(self, full: bool) -> dict | None:
        limit = ENV_TIMEOUT_S
        path = self.tmp / "env.json"
        # The first child runs before CUDA is known: leave TRITON_INTERPRET etc. as they are.
        cmd = worker_cmd("env", "--worker-out", str(path)) + (["--full"] if full else [])
        res = run_child(cmd, self.log("env"), limit, self.env())
        self.env_info = load_json(path)
        self.record("env", res, limit, budget=self.budgets["env"])
        return self.env_info

    # -- outputs
    def write_summary(self) -> None:
        if self.out is None:
            return
        env = self.env_info or {}
        if env:
            env = dict(env, phases=self.phases, command=self.command, budget_s=self.args.budget,
                       started=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds"),
                       elapsed_s=round(time.time() - self.started, 1),
                       result_dir_name=f"{dt.date.fromtimestamp(self.started).isoformat()}-{device_slug(env)}")
            (self.out / "env.json").write_text(json.dumps(env, indent=1))
        res = load_results(self.out)
        res["env"] = env
        lines = [f"# gpu_check summary: {env.get('device', {}).get('name', '?')}",
                 "", f"- date: {env.get('started', '?')} (UTC), elapsed {env.get('elapsed_s', '?')} s of {self.args.budget:.0f} s",
                 f"- command: `{self.command}`",
                 f"- torch {env.get('torch')}, triton {env.get('packages', {}).get('triton', {}).get('version')}, "
                 f"python {env.get('python')}" + (f", commit {env['git']['commit'][:12]}" + (" (dirty)" if env['git'].get('dirty') else "")
                                                   if env.get("git", {}).get("commit") else ""),
                 "", "## Phases", "", "| phase | status | seconds | limit | notes |", "|---|---|---|---|---|"]
        for name in PHASE_BUDGETS:
            p = self.phases.get(name)
            if not p:
                continue
            note = p.get("reason") or ""
            if "totals" in p:
                note = ", ".join(f"{k} {v}" for k, v in p["totals"].items())
            if "files" in p:
                note = f"{p.get('benchmarks', 0)} benchmarks; " + ", ".join(f"{Path(k).stem}: {v}" for k, v in p["files"].items())
            if "runs" in p:
                note = ", ".join(f"{k}: {v}" for k, v in p["runs"].items())
            if "configurations" in p:
                note = f"{p['configurations']} configurations"
            lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '')} | {p.get('limit_s', '')} | {note} |")
        miss = [PACKAGES[m] for m, v in env.get("packages", {}).items() if not v["found"]]
        lines += ["", f"Missing packages: {', '.join(miss) or 'none'}.", "", "## Goals", "", rows_to_markdown(goal_rows(res))]
        kt = res.get("kernel_tests") or {}
        if kt.get("failures"):
            lines += ["## Kernel test failures", ""] + [f"- `{f['test']}`: {f.get('message', f['kind'])}" for f in kt["failures"][:30]]
        eng = res.get("engine") or {}
        for name, r in (eng.get("runs") or {}).items():
            if r.get("error_tail"):
                lines += ["", f"## Engine run `{name}`: {r['status']}", "", "```", *r["error_tail"], "```"]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        with open(self.out / "log.txt", "w") as fh:
            for name in PHASE_BUDGETS:
                p = self.log(name)
                if p.exists():
                    fh.write(f"\n===== {name} =====\n")
                    fh.write(_capped(p.read_text(errors="replace")))

    def execute(self) -> int:
        a = self.args
        print(f"[gpu_check] repo {REPO}; budget {a.budget:.0f} s; phases {' '.join(a.phases)}", flush=True)
        env = self.run_env(full=True)
        if env is None:
            print("[gpu_check] the environment check failed; see below", flush=True)
            print(self.log("env").read_text(errors="replace")[-5000:])
            return 2
        self.out = resolve_out(a, env)
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"[gpu_check] results -> {self.out}", flush=True)
        lines, problems = env_report_lines(env, a.allow_cpu)
        print("\n".join("    " + ln for ln in lines), flush=True)
        self.write_summary()
        cuda = bool(env.get("cuda"))
        for phase in PHASES:
            if phase not in a.phases:
                continue
            if not cuda and not a.allow_cpu:
                self.skip(phase, "no CUDA device (--allow-cpu runs it on the CPU)")
                continue
            miss = missing_for(env, phase)
            if miss:
                self.skip(phase, "missing " + ", ".join(miss))
                continue
            print(f"[gpu_check] {phase}: start (limit {self.limit(phase):.0f} s)", flush=True)
            try:
                PHASES[phase].run_phase(self)
            except Exception as e:  # noqa: BLE001 - one phase's bug must not cost the others
                self.phases[phase] = {"status": "failed", "reason": f"gpu_check error: {type(e).__name__}: {e}"}
                print(f"[gpu_check] {phase}: gpu_check error {e!r}", flush=True)
            self.write_summary()
        self.write_summary()
        print("\n" + (self.out / "summary.md").read_text(), flush=True)
        bad = [p for p, v in self.phases.items() if v["status"] not in ("ok", "skipped")]
        return 1 if bad else 0

    def dry_run(self) -> int:
        a = self.args
        out_desc = str(a.out) if a.out else (f"$OUT ({os.environ['OUT']})" if os.environ.get("OUT") else
                                             "benchmarks/results/<date>-<device>/")
        print("gpu_check --dry-run: the plan and an environment check; nothing is measured or written\n")
        print(f"repo: {REPO}")
        for ln in plan_lines(a, out_desc):
            print(ln)
        env = self.run_env(full=False)
        print("\nenvironment (as the children of a real run see it):")
        if env is None:
            print("  the environment check failed:\n" + self.log("env").read_text(errors="replace")[-5000:])
            return 1
        lines, problems = env_report_lines(env, a.allow_cpu)
        print("\n".join("  " + ln for ln in lines))
        if not a.out and not os.environ.get("OUT"):
            print(f"\nresults would go to benchmarks/results/{dt.date.today().isoformat()}-{device_slug(env)}/")
        print("\nproblems for a device run:" if problems else "\nno problems found")
        for p in problems:
            print(f"  - {p}")
        # Exit 1 only when this checkout itself is unusable (imports fail); a CPU machine lacking
        # CUDA or the engine's packages is the expected state of a dry run.
        broken = [m for m, o in env.get("imports", {}).items() if not o["in_repo"]]
        return 1 if broken else 0

    def cleanup(self) -> None:
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"[gpu_check] temporary files kept in {self.tmp}")


def resolve_out(args, env: dict) -> Path:
    if args.out:
        return Path(args.out).resolve()
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]).resolve()
    return REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-{device_slug(env)}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the environment; run nothing")
    ap.add_argument("--out", help="results directory (default: $OUT if set, else benchmarks/results/<date>-<device>/)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds for all phases (default {DEFAULT_BUDGET})")
    ap.add_argument("--phases", nargs="+", default=list(PHASE_BUDGETS)[1:], choices=list(PHASE_BUDGETS)[1:],
                    help="which phases after env to run (default: all)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run the phases without CUDA (kernels interpreted; for testing this script)")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers for kernel tests (0: none)")
    ap.add_argument("--engine-steps", type=int, default=ENGINE_STEPS)
    ap.add_argument("--engine-batch", type=int, default=0, help="global batch (default: the preset's)")
    ap.add_argument("--engine-fast-config", default=ENGINE_FAST_CONFIG)
    ap.add_argument("--engine-original-config", default=ENGINE_ORIGINAL_CONFIG)
    ap.add_argument("--engine-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for both runs (repeatable)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, run dirs)")
    # internal: child workers
    ap.add_argument("--worker", choices=["env", "ceilings", "engine", "sweep"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        out = Path(args.worker_out)
        if args.worker == "env":
            environment.worker_env(out, args.full)
        elif args.worker == "ceilings":
            ceilings.worker_ceilings(out)
        elif args.worker == "sweep":
            sweep.worker_sweep(out, args.deadline, args.engine_fast_config)
        else:
            signal.signal(signal.SIGTERM, _terminate_children)
            engine.worker_engine(out, Path(args.tmp), args.deadline, args.engine_steps, args.engine_batch or None,
                          args.engine_extra, args.engine_fast_config, args.engine_original_config)
        return 0
    run = Run(args)
    signal.signal(signal.SIGTERM, _terminate_children)
    try:
        return run.dry_run() if args.dry_run else run.execute()
    finally:
        if not args.dry_run:
            with contextlib.suppress(Exception):
                run.write_summary()
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
