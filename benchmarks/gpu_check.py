#!/usr/bin/env python3
"""One prepared run on one GPU, inside one device window, that measures what the performance
claims rest on, the most valuable numbers first.

    bash benchmarks/gpu_check.sh                 # on the GPU machine (installs .whl/ first)
    python benchmarks/gpu_check.py --dry-run     # any machine: plan, wheel preflight, device call
    python benchmarks/gpu_check.py --allow-cpu --tiny --out DIR   # CPU rehearsal of every phase

Phases, in order, each a separate process group with its own time limit; the default budgets add
up to 400 s (``--window``, 420 s by default, is the most a plan may ask for):

1. ``env``          packages, device, where ``diti_fast`` and ``diti_fast.kernels`` come from   -> env.json
2. ``ceilings``     device-to-device copy bandwidth, bf16 / tf32 / fp32 matmul rates             -> ceilings.json
3. ``sweep``        the training step at 16 and 128 images per GPU: NHWC/NCHW x CUDA graph on/off
                    x fused on/off, and the original's configuration, one train() per row          -> sweep.json
4. ``kernels``      benchmarks/kernel_timing.py: fused kernels timed inside a CUDA graph          -> kernels.json
5. ``kernel_tests`` the kernels' test files, compiled                                -> env.json ("kernel_tests")
6. ``engine``       train() under DeepSpeed, original configuration vs preset, no compile         -> engine.json
7. ``compile``      optional, last: the preset with torch.compile, as far as the time left goes    -> compile.json

then ``summary.md`` (every phase: done, failed, killed by its limit, cut, not reached; every goal)
and ``log.txt``: 8 files, what a device run brings back at most. Each phase's JSON is written as the phase goes and summary.md before and after
every phase, so a window that ends early still returns what completed and names what did not.
``benchmarks/plot_results.py`` turns a results directory into figures and the table of
``docs/performance.md``.

The package need not be installed: ``diti_fast`` is imported from this checkout (its root goes on
PYTHONPATH) and ``kernels/`` is mapped to ``diti_fast.kernels`` by a generated
``sitecustomize.py`` on every child's PYTHONPATH. This parent process never imports torch.

Code map (``benchmarks/gpucheck/``): ``settings`` (budgets, files, goals, packages, wheels),
``children`` (the import shim, child environments, process groups with time limits), ``runs``
(timed ``train()`` runs in a child), one module per phase (``environment``, ``ceilings``,
``sweep``, ``kernels``, ``kernel_tests``, ``bench``, ``engine``, ``compile``), ``wheels`` (the
preflight of ``.whl/``) and ``results`` (the analysis, shared with ``plot_results.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpucheck/ beside this script; no install needed
from gpucheck import bench, ceilings, compile as compile_phase, engine, environment, kernel_tests, kernels, sweep  # noqa: E402
from gpucheck import wheels  # noqa: E402
from gpucheck.children import ChildResult, _terminate_children, child_env, run_child, write_shim  # noqa: E402
from gpucheck.environment import device_slug, env_report_lines, missing_for  # noqa: E402
from gpucheck.results import goal_rows, load_json, load_results, rows_to_markdown  # noqa: E402
from gpucheck.settings import (DEFAULT_WINDOW, DEVICE_CARRY, DEVICE_COMMAND, DEVICE_TIMEOUT_S,  # noqa: E402
                               ENGINE_BATCH, ENGINE_FAST_CONFIG, ENGINE_ORIGINAL_CONFIG, ENGINE_STEPS,
                               EXTRA_PHASE_BUDGETS, KERNEL_TESTS, KERNEL_TIMING_SCRIPT, KILL_GRACE_S,
                               LOG_CAP_BYTES, MIN_PHASE_S, OUTPUTS, PACKAGES, PHASE_BUDGETS, PHASE_ORDER, REPO,
                               SWEEP_BATCHES)

SELF = Path(__file__).resolve()
PHASES = {"ceilings": ceilings, "sweep": sweep, "kernels": kernels, "kernel_tests": kernel_tests, "bench": bench,
          "engine": engine, "compile": compile_phase}
ALL_BUDGETS = {**PHASE_BUDGETS, **EXTRA_PHASE_BUDGETS}
WHAT = {
    "env": "packages, CUDA device, import origins (diti_fast.kernels through the shim)",
    "ceilings": "copy bandwidth (benchmarks/conftest.py), 8192³ matmul bf16/tf32/fp32",
    "sweep": "train() per row, batch " + "/".join(map(str, SWEEP_BATCHES)) + " per GPU: the preset and the original's "
             "configuration first, then NHWC/NCHW x CUDA graph on/off x fused on/off; no compile",
    "kernels": f"python {KERNEL_TIMING_SCRIPT} --json kernels.json (CUDA-graph timings, GB/s vs copy)",
    "kernel_tests": "pytest " + " ".join(Path(t).name for t in KERNEL_TESTS) + " (compiled; files present only)",
    "bench": "pytest-benchmark kernel files (optional)",
    "engine": f"train() under DeepSpeed: original configuration vs preset (then fp32 preset), {ENGINE_STEPS} steps "
              f"of {ENGINE_BATCH}, no compile",
    "compile": "optional: the preset with torch.compile at batch 16, as far as the time left goes",
}


def worker_cmd(name: str, *args: str) -> list[str]:
    """The command line of a phase's child: this script again, in worker mode."""
    return [sys.executable, str(SELF), "--worker", name, *args]


def _pairs(items: list[str], what: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in ALL_BUDGETS:
            raise SystemExit(f"gpu_check: {what} {item!r}: expected PHASE=SECONDS with PHASE one of "
                             f"{', '.join(ALL_BUDGETS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"gpu_check: {what} {item!r}: {value!r} is not a number of seconds") from None
    return out


def selected_phases(args) -> list[str]:
    return ["env"] + [p for p in PHASE_ORDER if p in args.phases and p != "env"]


def phase_budgets(args) -> dict[str, float]:
    """Seconds per selected phase (env always), in run order: the defaults, then --phase-budget,
    then scaled so that they add up to --budget when it is given."""
    sel = selected_phases(args)
    own = _pairs(args.phase_budget, "--phase-budget")
    b = {p: own.get(p, ALL_BUDGETS[p]) for p in sel}
    if args.budget is not None:
        total = sum(b.values())
        b = {p: v * args.budget / total for p, v in b.items()}
    return b


def device_call(args) -> dict:
    """The device tool's run call for this plan."""
    extra = []
    if args.budget is not None:
        extra += ["--budget", f"{args.budget:g}"]
    if args.window != DEFAULT_WINDOW:
        extra += ["--window", f"{args.window:g}"]
    if list(args.phases) != list(PHASE_BUDGETS)[1:]:
        extra += ["--phases", *args.phases]
    for pb in args.phase_budget:
        extra += ["--phase-budget", pb]
    cmd = DEVICE_COMMAND + (" " + shlex.join(extra) if extra else "")
    # The device tool's timeout is the window itself (the plan leaves its last seconds for the
    # summary); the tool takes at most 600 s.
    return {"command": cmd, "carry": list(DEVICE_CARRY),
            "timeout_s": int(min(args.window if args.window != DEFAULT_WINDOW else DEVICE_TIMEOUT_S, 600))}


def plan_lines(args, out_desc: str) -> list[str]:
    b = phase_budgets(args)
    total = sum(b.values())
    lines = [f"output directory: {out_desc}",
             "phases in order (budget in s; unused seconds carry forward, no phase eats into the later ones'):"]
    for i, (p, s) in enumerate(b.items(), 1):
        lines.append(f"  {i}. {p:<13} {s:5.0f} s -> {OUTPUTS.get(p, '-'):<18} {WHAT[p]}")
    lines.append(f"  total {total:.0f} s of a {args.window:.0f} s window (counted from gpu_check.sh's start, the wheel "
                 f"install included); then summary.md and log.txt")
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
        self.current: str | None = None
        self.kernel_tests: dict | None = None   # the kernel_tests phase's summary, kept in env.json
        # The window is counted from gpu_check.sh's start when it sets GPU_CHECK_T0 (the wheel
        # install then counts too), else from now.
        self.started = time.time()
        t0 = float(os.environ.get("GPU_CHECK_T0") or self.started)
        self.budgets = phase_budgets(args)
        self.deadline = min(t0, self.started) + sum(self.budgets.values())
        self.caps = _pairs(args.phase_limit, "--phase-limit")
        self.slack = 0.0
        self.share = 0.0
        self.command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(
            ["python", str(SELF.relative_to(REPO)), *sys.argv[1:]])

    worker_cmd = staticmethod(worker_cmd)

    def env(self, extra: dict | None = None) -> dict:
        cuda = None if self.env_info is None else bool(self.env_info.get("cuda"))
        return child_env(self.shim, cuda, extra)

    def log(self, phase: str) -> Path:
        return self.tmp / f"{phase}.log"

    def limit(self, phase: str, capped: bool = True) -> float:
        """The time limit handed to this phase's child: its budget plus what earlier phases left
        unused, never past the deadline minus the budgets of the phases still to come, less the
        kill's grace period (so a killed phase still ends inside its share); --phase-limit caps it."""
        names = list(self.budgets)
        later = sum(self.budgets[n] for n in names[names.index(phase) + 1:])
        own = self.budgets[phase] + self.slack
        lim = min(own, self.deadline - time.time() - later) - KILL_GRACE_S
        if capped and phase in self.caps:
            lim = min(lim, self.caps[phase])
        return max(0.0, lim)

    def record(self, phase: str, res: ChildResult, limit: float, budget: float | None = None, **extra) -> None:
        self.phases[phase] = {"status": res.status, "returncode": res.returncode, "wall_s": round(res.wall_s, 1),
                              "limit_s": round(limit, 1), **extra}
        if res.status == "timeout":
            self.phases[phase].setdefault("reason", f"killed by its time limit ({limit:.0f} s)")
        # What this phase left of its own share (its budget plus the slack it was handed, a
        # --phase-limit cap aside) goes to the next one.
        share = self.share if budget is None else budget
        self.slack = max(0.0, share - res.wall_s)
        print(f"[gpu_check] {phase}: {res.status} in {res.wall_s:.0f} s (limit {limit:.0f} s)", flush=True)
        if res.status not in ("ok", "skipped"):
            tail = self.log(phase).read_text(errors="replace").splitlines()[-25:] if self.log(phase).exists() else []
            print("\n".join("    " + ln for ln in tail), flush=True)

    def skip(self, phase: str, why: str, status: str = "skipped") -> None:
        self.phases[phase] = {"status": status, "reason": why}
        self.slack += self.budgets.get(phase, 0.0)  # its time goes to the next phase
        print(f"[gpu_check] {phase}: {status} ({why})", flush=True)

    # -- phases
    def run_env(self, full: bool) -> dict | None:
        path = self.tmp / "env.json"
        limit = max(self.limit("env"), 20.0) if not self.args.dry_run else 120.0
        # The first child runs before CUDA is known: leave TRITON_INTERPRET etc. as they are.
        cmd = worker_cmd("env", "--worker-out", str(path)) + (["--full"] if full else [])
        res = run_child(cmd, self.log("env"), limit, self.env())
        self.env_info = load_json(path)
        self.record("env", res, limit, budget=self.budgets["env"])
        return self.env_info

    # -- outputs
    def phase_table(self) -> list[tuple[str, dict]]:
        """Every selected phase with its state, the ones not run included."""
        rows = []
        for name in self.budgets:
            p = self.phases.get(name)
            if p is None:
                if name == self.current:
                    p = {"status": "cut", "reason": "the run ended during this phase (window over or killed)"}
                else:
                    p = {"status": "not reached", "reason": "the run ended before it started"}
            rows.append((name, p))
        return rows

    def has_output(self, phase: str) -> bool:
        if phase == "kernel_tests":
            return self.kernel_tests is not None
        return self.out is not None and (self.out / OUTPUTS[phase]).is_file()

    def write_summary(self) -> None:
        if self.out is None:
            return
        for stray in self.out.glob("*.part"):
            stray.unlink(missing_ok=True)
        env = self.env_info or {}
        table = self.phase_table()
        if env:
            env = dict(env, phases=dict(table), kernel_tests=self.kernel_tests, command=self.command, budget_s=round(sum(self.budgets.values())),
                       window_s=self.args.window, budgets={k: round(v, 1) for k, v in self.budgets.items()},
                       rehearsal=not env.get("cuda"), tiny=bool(self.args.tiny),
                       started=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds"),
                       elapsed_s=round(time.time() - self.started, 1),
                       result_dir_name=f"{dt.date.fromtimestamp(self.started).isoformat()}-{device_slug(env)}")
            (self.out / "env.json").write_text(json.dumps(env, indent=1))
        res = load_results(self.out)
        res["env"] = env
        rehearsal = not env.get("cuda")
        lines = [f"# gpu_check summary: {env.get('device', {}).get('name', '?')}"
                 + (" (CPU rehearsal: nothing here is a GPU figure)" if rehearsal else ""),
                 "", f"- date: {env.get('started', '?')} (UTC), elapsed {env.get('elapsed_s', '?')} s; plan "
                 f"{sum(self.budgets.values()):.0f} s of a {self.args.window:.0f} s window",
                 f"- command: `{self.command}`",
                 f"- torch {env.get('torch')}, triton {env.get('packages', {}).get('triton', {}).get('version')}, "
                 f"python {env.get('python')}" + (f", commit {env['git']['commit'][:12]}" + (" (dirty)" if env['git'].get('dirty') else "")
                                                   if env.get("git", {}).get("commit") else ""),
                 "", "## Phases", "", "| phase | status | seconds | limit | output | notes |", "|---|---|---|---|---|---|"]
        for name, p in table:
            note = p.get("reason") or ""
            for key in ("rows", "entries", "totals", "runs", "files"):
                if key in p:
                    v = p[key]
                    note = (note + "; " if note else "") + (", ".join(f"{k}: {x}" for k, x in v.items())
                                                            if isinstance(v, dict) else f"{key}: {v}")
            have = OUTPUTS[name] if self.has_output(name) else "missing"
            lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '')} | {p.get('limit_s', '')} | {have} | {note} |")
        unreached = [n for n, p in table if p["status"] in ("not reached", "cut")]
        killed = [n for n, p in table if p["status"] == "timeout"]
        missing = [n for n, _ in table if not self.has_output(n)]
        lines += ["", f"Killed by their limit: {', '.join(killed) or 'none'}. "
                      f"Cut or not reached: {', '.join(unreached) or 'none'}. "
                      f"Results missing: {', '.join(n for n in missing) or 'none'}."]
        miss = [PACKAGES[m] for m, v in env.get("packages", {}).items() if not v["found"]]
        lines += ["", f"Missing packages: {', '.join(miss) or 'none'}.", "", "## Goals", "",
                  rows_to_markdown(goal_rows(res))]
        kt = res.get("kernel_tests") or {}
        if kt.get("failures"):
            lines += ["## Kernel test failures", ""] + [f"- `{f['test']}`: {f.get('message', f['kind'])}" for f in kt["failures"][:30]]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        with open(self.out / "log.txt", "w") as fh:
            for name in self.budgets:
                p = self.log(name)
                if p.exists():
                    fh.write(f"\n===== {name} =====\n")
                    fh.write(_capped(p.read_text(errors="replace")))

    def execute(self) -> int:
        a = self.args
        print(f"[gpu_check] repo {REPO}; plan {sum(self.budgets.values()):.0f} s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in self.budgets.items()), flush=True)
        self.current = "env"
        env = self.run_env(full=True)
        if env is None:
            print("[gpu_check] the environment check failed; see below", flush=True)
            print(self.log("env").read_text(errors="replace")[-5000:])
            return 2
        self.out = resolve_out(a, env)
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"[gpu_check] results -> {self.out}", flush=True)
        lines, _ = env_report_lines(env, a.allow_cpu)
        print("\n".join("    " + ln for ln in lines), flush=True)
        cuda = bool(env.get("cuda"))
        for phase in list(self.budgets)[1:]:
            self.current = phase
            if not cuda and not a.allow_cpu:
                self.skip(phase, "no CUDA device (--allow-cpu runs it on the CPU)")
                continue
            miss = missing_for(env, phase)
            if miss:
                self.skip(phase, "missing " + ", ".join(miss))
                continue
            if self.limit(phase, capped=False) < MIN_PHASE_S:
                self.skip(phase, f"under {MIN_PHASE_S} s of the window left", status="not reached")
                continue
            self.write_summary()  # if the window ends during this phase, the summary says so
            self.share = self.budgets[phase] + self.slack
            print(f"[gpu_check] {phase}: start (limit {self.limit(phase):.0f} s)", flush=True)
            try:
                PHASES[phase].run_phase(self)
            except Exception as e:  # noqa: BLE001 - one phase's bug must not cost the others
                self.phases[phase] = {"status": "failed", "reason": f"gpu_check error: {type(e).__name__}: {e}"}
                print(f"[gpu_check] {phase}: gpu_check error {e!r}", flush=True)
        self.current = None
        self.write_summary()
        print("\n" + (self.out / "summary.md").read_text(), flush=True)
        bad = [p for p, v in self.phases.items() if v["status"] not in ("ok", "skipped")]
        return 1 if bad else 0

    def dry_run(self) -> int:
        a = self.args
        out_desc = str(a.out) if a.out else (f"$OUT ({os.environ['OUT']})" if os.environ.get("OUT") else
                                             "benchmarks/results/<date>-<device>/")
        print("gpu_check --dry-run: the plan, the wheel preflight, the device call and an environment check; "
              "nothing is measured or written\n")
        print(f"repo: {REPO}")
        for ln in plan_lines(a, out_desc):
            print(ln)
        status = 0
        print(f"\nwheel preflight ({a.wheels}: what the GPU machine lacks, for Python 3.12):")
        if a.no_wheel_check:
            print("  not run (--no-wheel-check)")
        else:
            pre = wheels.check_wheels(Path(a.wheels), import_check=not a.no_import_check)
            print("\n".join("  " + ln for ln in wheels.report_lines(pre)))
            if not pre["ok"]:
                print("  -> run `make gpu-wheels` here; without these wheels the GPU machine skips "
                      "sweep, engine and compile")
                status = 3
        call = device_call(a)
        print("\ndevice call (the device tool's run):")
        print(f"  command:   {call['command']}")
        print(f"  carry:     {json.dumps(call['carry'])}")
        print(f"  timeout_s: {call['timeout_s']}")
        env = self.run_env(full=False)
        print("\nenvironment (as the children of a real run see it):")
        if env is None:
            print("  the environment check failed:\n" + self.log("env").read_text(errors="replace")[-5000:])
            return 1
        lines, problems = env_report_lines(env, a.allow_cpu)
        print("\n".join("  " + ln for ln in lines))
        if not a.out and not os.environ.get("OUT"):
            print(f"\nresults would go to benchmarks/results/{dt.date.today().isoformat()}-{device_slug(env)}/")
        print("\nproblems for a run here:" if problems else "\nno problems found")
        for p in problems:
            print(f"  - {p}")
        # Exit 1 when this checkout itself is unusable (imports fail), 3 when the wheels are not
        # ready; a CPU machine lacking CUDA is the expected state of a dry run.
        broken = [m for m, o in env.get("imports", {}).items() if not o["in_repo"]]
        return 1 if broken else status

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
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan, the wheel preflight and the device call; check the environment; run nothing")
    ap.add_argument("--out", help="results directory (default: $OUT if set, else benchmarks/results/<date>-<device>/)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all phases, the phase budgets scaled to it (default: their sum, "
                         f"{sum(PHASE_BUDGETS.values())})")
    ap.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                    help=f"the most seconds a plan may take (default {DEFAULT_WINDOW}); a plan over it is refused")
    ap.add_argument("--phases", nargs="+", default=list(PHASE_BUDGETS)[1:], choices=PHASE_ORDER[1:],
                    help="which phases after env to run (default: " + " ".join(list(PHASE_BUDGETS)[1:]) + ")")
    ap.add_argument("--phase-budget", action="append", default=[], metavar="PHASE=SECONDS",
                    help="a phase's own budget (repeatable)")
    ap.add_argument("--phase-limit", action="append", default=[], metavar="PHASE=SECONDS",
                    help="a hard cap on a phase's time limit, slack included (repeatable)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run the phases without CUDA (kernels interpreted; for testing this script)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny sizes (the CPU rehearsal): shapes32 network, batch 2, a few steps, tests collected only")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="the wheel folder the dry run checks (default .whl/)")
    ap.add_argument("--no-wheel-check", action="store_true", help="dry run: skip the wheel preflight")
    ap.add_argument("--no-import-check", action="store_true", help="dry run: check wheel tags and contents only")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers for kernel tests (0: none)")
    ap.add_argument("--engine-steps", type=int, default=ENGINE_STEPS)
    ap.add_argument("--engine-batch", type=int, default=ENGINE_BATCH, help="global batch of the engine phase")
    ap.add_argument("--engine-fast-config", default=ENGINE_FAST_CONFIG)
    ap.add_argument("--engine-original-config", default=ENGINE_ORIGINAL_CONFIG)
    ap.add_argument("--engine-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for the engine phase's runs (repeatable)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, run dirs)")
    # internal: child workers
    ap.add_argument("--worker", choices=["env", "ceilings", "sweep", "engine", "compile"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap


def run_worker(args) -> int:
    out = Path(args.worker_out)
    if args.worker == "env":
        environment.worker_env(out, args.full)
    elif args.worker == "ceilings":
        ceilings.worker_ceilings(out, args.tiny)
    elif args.worker == "sweep":
        sweep.worker_sweep(out, Path(args.tmp), args.deadline, args.engine_fast_config,
                           args.engine_original_config, args.tiny)
    elif args.worker == "engine":
        engine.worker_engine(out, Path(args.tmp), args.deadline, args.engine_steps, args.engine_batch,
                             args.engine_extra, args.engine_fast_config, args.engine_original_config, args.tiny)
    else:
        compile_phase.worker_compile(out, Path(args.tmp), args.deadline, args.engine_fast_config, args.tiny)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    budgets = phase_budgets(args)
    total = sum(budgets.values())
    if total > args.window:
        print(f"gpu_check: the plan needs {total:.0f} s ("
              + ", ".join(f"{k} {v:.0f}" for k, v in budgets.items())
              + f"), more than the {args.window:.0f} s window; lower --budget or --phase-budget", file=sys.stderr)
        return 2
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
