"""Phase ``kernels``: ``benchmarks/kernel_timing.py`` (the fused GroupNorm and loss kernels timed
inside a CUDA graph at the presets' shapes, NCHW and NHWC, forward and backward, GB/s against the
measured copy bandwidth, host overhead per call). The script writes its JSON as it goes, so a
phase cut short keeps what it timed. Without CUDA it runs its ``--tiny`` CPU rehearsal."""
from __future__ import annotations

import json
import sys

from gpucheck.children import ChildResult, run_child
from gpucheck.results import load_json
from gpucheck.settings import KERNEL_TIMING_SCRIPT, REPO


def run_phase(ctx) -> None:
    script = REPO / KERNEL_TIMING_SCRIPT
    limit = ctx.limit("kernels")
    out = ctx.out / "kernels.json"
    cuda = bool(ctx.env_info.get("cuda"))
    cmd = [sys.executable, str(script), "--json", str(out)] + ([] if cuda and not ctx.args.tiny else ["--tiny"])
    res = run_child(cmd, ctx.log("kernels"), limit, ctx.env())
    data = load_json(out)
    if data is None and res.status == "ok":
        res = ChildResult("failed", res.returncode, res.wall_s)
    entries = 0
    if isinstance(data, dict):
        entries = sum(len(v) for v in data.values() if isinstance(v, list))
    elif out.is_file():
        # written incrementally and cut mid-write: keep the text, say it is not valid JSON
        out.write_text(json.dumps({"unparsed": out.read_text(errors="replace")[-100_000:], "cut": True}))
    ctx.record("kernels", res, limit, entries=entries, command=" ".join(cmd[1:]))
