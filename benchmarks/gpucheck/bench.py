"""Phase ``bench``: the kernel, loss, attention and masked-latent benchmarks (pytest-benchmark), one
pytest run per file so a file that hangs costs only its own results; entries stream to a side file
as they finish (pytest-benchmark writes its JSON only at the end of a session)."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from gpucheck.children import ChildResult, run_child
from gpucheck.results import load_json
from gpucheck.settings import BENCH_ARGS, BENCH_FILES, REPO


def run_phase(ctx) -> None:
    limit = ctx.limit("bench")
    t_end = time.time() + limit
    files = [f for f in BENCH_FILES if (REPO / f).is_file()]
    merged: dict = {"benchmarks": [], "runs": []}
    t0, statuses = time.monotonic(), []
    for i, f in enumerate(files):
        share = BENCH_FILES[f] / sum(BENCH_FILES[g] for g in files[i:])
        sub = max(0.0, (t_end - time.time()) * share)
        js = ctx.tmp / f"bench-{Path(f).stem}.json"
        stream = ctx.tmp / f"bench-{Path(f).stem}.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rfE", "-p", "no:cacheprovider",
               "-p", "gpu_check_stream", f, *BENCH_ARGS, f"--benchmark-json={js}"]
        res = run_child(cmd, ctx.log("bench"), sub, ctx.env({"GPU_CHECK_BENCH_STREAM": str(stream)}))
        data = load_json(js) or {}
        found = data.get("benchmarks", [])
        partial = not found and res.status != "ok" and stream.is_file()
        if partial:  # killed before pytest-benchmark wrote its JSON: what finished was streamed
            found = [json.loads(ln) for ln in stream.read_text().splitlines() if ln.strip()]
        for k in ("machine_info", "commit_info", "datetime", "version"):
            if data.get(k) is not None:
                merged.setdefault(k, data[k])
        merged["benchmarks"] += found
        merged["runs"].append({"file": f, "status": res.status, "returncode": res.returncode,
                               "wall_s": round(res.wall_s, 1), "limit_s": round(sub, 1), "partial": partial,
                               "benchmarks": len(found), "command": shlex.join(cmd)})
        statuses.append(res.status)
    (ctx.out / "bench_kernels.json").write_text(json.dumps(merged, indent=1))
    status = "ok" if all(s == "ok" for s in statuses) else \
        ("timeout" if "timeout" in statuses else "failed")
    ctx.record("bench", ChildResult(status, None, time.monotonic() - t0), limit,
                benchmarks=len(merged["benchmarks"]), files={r["file"]: r["status"] for r in merged["runs"]})
