"""Phase ``kernel_tests``: the kernels' own test files (no engine tests), compiled on the GPU,
summarised from junit XML (or from pytest's -v lines when the phase limit killed pytest before it
wrote the XML). The CPU rehearsal (--tiny) only collects them: CI runs them anyway."""
from __future__ import annotations

import re
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from gpucheck.children import run_child
from gpucheck.settings import KERNEL_TESTS, REPO

def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases, failures = [], []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append({"test": name, "kind": child.tag,
                                 "message": (child.get("message") or "")[:400],
                                 "detail": (child.text or "")[-1500:]})
            elif child.tag == "skipped":
                outcome = "skipped"
        cases.append({"test": name, "outcome": outcome, "s": float(tc.get("time") or 0)})
    totals = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    totals["total"] = len(cases)
    slow = sorted(cases, key=lambda c: -c["s"])[:10]
    return {"totals": totals, "failures": failures, "slowest": slow}


_VERBOSE_LINE = re.compile(r"(?:\[gw\d+\]\s+)?(?:\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
                           r"|(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose_log(text: str) -> dict:
    """Fallback when pytest was killed before writing its junit file: read its -v lines."""
    seen: dict[str, str] = {}
    for m in _VERBOSE_LINE.finditer(text):
        outcome, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[name] = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "XPASS": "passed",
                      "XFAIL": "skipped", "SKIPPED": "skipped"}[outcome]
    totals = {k: sum(v == k for v in seen.values()) for k in ("passed", "failed", "error", "skipped")}
    totals["total"] = len(seen)
    out = {"totals": totals, "failures": [{"test": n, "kind": o} for n, o in seen.items() if o in ("failed", "error")],
           "slowest": [], "from_log": True}
    # -v prints a test's name when it starts: the last name without an outcome is what was running.
    started = re.findall(r"^(\S+::\S+) *$", text, flags=re.M)
    if started and started[-1] not in seen:
        out["running_when_stopped"] = started[-1]
    return out


def run_phase(ctx) -> None:
    """Parent side: pytest -v on the kernel test files; the summary goes into env.json."""
    limit = ctx.limit("kernel_tests")
    tests = [t for t in KERNEL_TESTS if (REPO / t).is_file()]
    junit = ctx.tmp / "kernel_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-o", "junit_family=xunit2", *tests]
    pk = ctx.env_info["packages"]
    if ctx.args.tiny:
        cmd.append("--collect-only")
    elif ctx.args.test_workers and pk.get("xdist", {}).get("found"):
        # Triton compiles each kernel specialisation on the CPU: several workers keep the cores busy.
        cmd += ["-n", str(ctx.args.test_workers)]
    res = run_child(cmd, ctx.log("kernel_tests"), limit, ctx.env())
    if junit.is_file():
        summary = parse_junit(junit)
    else:
        summary = parse_verbose_log(ctx.log("kernel_tests").read_text(errors="replace"))
    # pytest exit 1 = some test failed: the phase ran; the totals say what failed.
    summary.update(status=res.status, returncode=res.returncode, files=tests, command=shlex.join(cmd),
                   compiled=bool(ctx.env_info.get("cuda")), wall_s=res.wall_s,
                   rehearsal=not ctx.env_info.get("cuda"), collected_only=bool(ctx.args.tiny),
                   device=ctx.env_info.get("device", {}).get("name"))
    ctx.kernel_tests = summary
    ctx.record("kernel_tests", res, limit, totals=summary["totals"])
