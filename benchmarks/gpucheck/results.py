"""Results analysis of a gpu_check results directory: every goal as a table row, engine runs
summarised and compared. Pure Python (no torch): used for gpu_check's ``summary.md`` and by
``benchmarks/plot_results.py`` for the figures and the table of docs/performance.md."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from gpucheck.settings import ENGINE_WARMUP_STEPS, GOALS, LOSS_MATCH_TOL

def load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bench_entries(bench: dict | None) -> list[dict]:
    """pytest-benchmark JSON -> [{file, test, params, median, extra}]."""
    out = []
    for b in (bench or {}).get("benchmarks", []):
        full = b.get("fullname", "")
        out.append({"file": Path(full.split("::")[0]).name, "test": b.get("name", ""),
                    "params": b.get("params") or {}, "median": (b.get("stats") or {}).get("median"),
                    "extra": b.get("extra_info") or {}})
    return out


def bench_groups(entries: list[dict], file: str, variant_key: str) -> dict[tuple, dict[str, dict]]:
    """{(other params as sorted (k, v) pairs): {variant: entry}} for one bench file."""
    groups: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        if e["file"] != file or variant_key not in e["params"]:
            continue
        key = tuple(sorted((k, str(v)) for k, v in e["params"].items() if k != variant_key))
        groups.setdefault(key, {})[str(e["params"][variant_key])] = e
    return groups


def ratio(slow: dict | None, fast: dict | None) -> float | None:
    if not slow or not fast or not slow.get("median") or not fast.get("median"):
        return None
    return slow["median"] / fast["median"]


def fmt_x(v: float) -> str:
    return f"{v:.2f}×"


def fmt_pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def fmt_num(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def fmt_rate(v: float) -> str:
    """TFLOP/s: one decimal on a GPU, three significant digits for a CPU's fraction of one."""
    return fmt_num(v, 1) if v >= 10 else f"{v:.3g}"


def fmt_gib(v: float) -> str:
    return f"{v / 2 ** 30:.2f} GiB"


def _row(area, case, metric, measured, goal="", met=None) -> dict:
    return {"area": area, "case": case, "metric": metric, "measured": measured, "goal": goal,
            "met": None if met is None else bool(met)}


def _res_of(shape: str) -> int | None:
    m = re.search(r"_(\d+)x\d+$", shape)
    return int(m.group(1)) if m else None


def goal_rows(results: dict) -> list[dict]:
    """Every performance goal (the table in docs/performance.md), measured or marked missing.

    ``results``: {"env", "ceilings", "kernel_tests", "bench", "engine"} as loaded from a results
    directory (any may be None). Rows whose goal needs data that is absent say so."""
    rows: list[dict] = []
    ceil = results.get("ceilings") or {}
    on_gpu = bool((results.get("env") or {}).get("cuda"))
    if ceil.get("copy_GBps"):
        rows.append(_row("Ceiling", "device-to-device copy", "bandwidth (read+write)",
                         f"{fmt_num(ceil['copy_GBps'], 0)} GB/s"))
    for label in ("bf16", "tf32", "fp32"):
        mm = (ceil.get("matmul") or {}).get(label)
        if mm:
            rows.append(_row("Ceiling", f"{mm['n']}³ matmul {label}", "rate", f"{fmt_rate(mm['TFLOPs'])} TFLOP/s"))

    kt = results.get("kernel_tests")
    if kt and kt.get("totals"):
        t = kt["totals"]
        bad = t.get("failed", 0) + t.get("error", 0)
        mode = "compiled" if kt.get("compiled") else "interpreted"
        rows.append(_row("Kernel tests", f"{t.get('total', 0)} tests, {mode}", "passed / failed / skipped",
                         f"{t.get('passed', 0)} / {bad} / {t.get('skipped', 0)}", "all pass",
                         bad == 0 and t.get("passed", 0) > 0 and kt.get("status") == "ok"))

    entries = bench_entries(results.get("bench"))
    copy = ceil.get("copy_GBps")
    # Adaptive GroupNorm: fwd+bwd at 32² and 64² against the copy bandwidth, eager and compile.
    agn = bench_groups(entries, "bench_fused_norm.py", "variant")
    agn_goal = sorted((k for k in agn if dict(k).get("mode") == "fwd_bwd" and _res_of(dict(k)["shape"]) in (32, 64)),
                      key=lambda k: (dict(k)["dtype"], dict(k)["shape"]))
    for key in agn_goal:
        p, g = dict(key), agn[key]
        tri = g.get("triton")
        case = f"{p['shape']} {p['dtype']} fwd+bwd"
        if not tri:
            continue
        frac = tri["extra"].get("fraction_of_copy")
        if frac is None and copy and tri["extra"].get("min_traffic_GBps"):
            frac = tri["extra"]["min_traffic_GBps"] / copy
        if frac is not None:
            gbps = tri["extra"].get("min_traffic_GBps")
            rows.append(_row("GroupNorm", case, "fraction of copy bandwidth",
                             fmt_pct(frac) + (f" ({fmt_num(gbps, 0)} GB/s)" if gbps else ""),
                             f"≥ {fmt_pct(GOALS['gn_frac_copy'])}", frac >= GOALS["gn_frac_copy"]))
        for base, goal in (("eager", "gn_vs_eager"), ("compile", "gn_vs_compile")):
            r = ratio(g.get(base), tri)
            if r is not None:
                rows.append(_row("GroupNorm", case, f"speed-up over {base}", fmt_x(r), f"≥ {fmt_x(GOALS[goal])}",
                                 r >= GOALS[goal]))
    # DiTi loss: the Triton kernel against torch.compile of the same outputs.
    loss = bench_groups(entries, "bench_fused_loss.py", "variant")
    for key in sorted(loss, key=lambda k: (dict(k)["dtype"], dict(k)["shape"])):
        p, g = dict(key), loss[key]
        case = f"{p['shape']} {p['dtype']} fwd+bwd"
        r = ratio(g.get("compile"), g.get("triton"))
        if r is not None:
            rows.append(_row("DiTi loss", case, "speed-up over compile", fmt_x(r),
                             f"≥ {fmt_x(GOALS['loss_vs_compile'])}", r >= GOALS["loss_vs_compile"]))
        elif not on_gpu and g.get("compile") and g.get("eager"):
            rows.append(_row("DiTi loss", case + " (CPU)", "compile over eager", fmt_x(ratio(g["eager"], g["compile"]))))
    # Attention: sdpa against math at the 16x16 levels (legacy layout; the new one costs the same copy).
    attn = bench_groups(entries, "bench_attention.py", "backend")
    for key in sorted(attn, key=lambda k: (dict(k)["level"], dict(k)["scope"], dict(k)["dtype"])):
        p, g = dict(key), attn[key]
        if not p["level"].endswith("16x16") or p.get("new_order") not in ("False", None):
            continue
        r = ratio(g.get("math"), g.get("sdpa"))
        if r is None:
            continue
        case = f"{p['level']} {p['scope']} {p['dtype']}"
        if on_gpu and p["dtype"] == "bf16":
            rows.append(_row("Attention", case, "sdpa over math", fmt_x(r), f"≥ {fmt_x(GOALS['attn_sdpa_vs_math'])}",
                             r >= GOALS["attn_sdpa_vs_math"]))
        elif not on_gpu:
            rows.append(_row("Attention", case + " (CPU)", "sdpa over math", fmt_x(r)))
    # Engine: 200 steps, preset vs the original's configuration.
    eng = results.get("engine") or {}
    runs = eng.get("runs") or {}
    f, o = runs.get("fast") or {}, runs.get("original") or {}
    cmp_ = eng.get("comparison") or {}
    net = Path(str((runs.get("fast") or runs.get("original") or {}).get("config") or "celeba64")).stem
    label = f"{net}, {eng.get('steps', '?')} steps, batch {eng.get('batch', '?')}"
    if f.get("images_per_s_steady") and o.get("images_per_s_steady"):
        sp = f["images_per_s_steady"] / o["images_per_s_steady"]
        steps = eng.get("steps")
        done = lambda r: r.get("steps_done") or max((st for st, _ in r.get("loss_curve") or []), default=0)  # noqa: E731
        short = [f"{k} {done(r)}/{steps} steps" for k, r in (("original", o), ("preset", f))
                 if steps and done(r) < steps]
        rows.append(_row("Engine", label, "images/s, preset vs original config",
                         f"{fmt_x(sp)} ({fmt_num(f['images_per_s_steady'])} vs {fmt_num(o['images_per_s_steady'])} img/s)"
                         + (f" (incomplete: {', '.join(short)})" if short else ""),
                         f"≥ {fmt_x(GOALS['engine_speedup'])}", sp >= GOALS["engine_speedup"] and not short))
    elif runs:
        rows.append(_row("Engine", label, "images/s, preset vs original config",
                         f"not measured (original: {o.get('status', 'absent')}, preset: {f.get('status', 'absent')})",
                         f"≥ {fmt_x(GOALS['engine_speedup'])}", False))
    if f.get("peak_memory_bytes") and o.get("peak_memory_bytes"):
        rows.append(_row("Engine", label, "peak memory, preset vs original",
                         f"{fmt_gib(f['peak_memory_bytes'])} vs {fmt_gib(o['peak_memory_bytes'])}", "lower",
                         f["peak_memory_bytes"] < o["peak_memory_bytes"]))
    rows += _loss_row(label, "loss", cmp_)
    f32 = runs.get("fast_fp32") or {}
    if f32.get("images_per_s_steady") and o.get("images_per_s_steady"):
        # Like against like: fp32 both, so this is the kernels', sdpa's, compile's and the graph's
        # own share; the bf16 preset's row above also holds bf16's.
        sp32 = f32["images_per_s_steady"] / o["images_per_s_steady"]
        rows.append(_row("Engine", label, "images/s, fp32 preset vs original config (both fp32)",
                         f"{fmt_x(sp32)} ({fmt_num(f32['images_per_s_steady'])} vs "
                         f"{fmt_num(o['images_per_s_steady'])} img/s)"))
    elif runs and "fast_fp32" in runs:
        rows.append(_row("Engine", label, "images/s, fp32 preset vs original config (both fp32)",
                         f"not measured (fp32 preset: {f32.get('status', 'absent')})"))
    rows += _loss_row(label, "loss, fp32 preset", eng.get("comparison_fp32") or {})
    if f.get("first_interval_s") and o.get("first_interval_s"):
        rows.append(_row("Engine", label, f"first {f.get('first_interval_steps')} steps incl. start-up",
                         f"{f['first_interval_s']:.1f} s vs {o['first_interval_s']:.1f} s"))
    rows += sweep_rows(results.get("sweep"), ceil)
    rows += kernel_timing_rows(results.get("kernels"))
    rows += compile_rows(results.get("compile"))
    if on_gpu:
        # A goal whose measurement is missing (phase skipped, failed or cut short) is a row too.
        wanted = [("Kernel tests", "passed / failed / skipped", "all pass"),
                  ("GroupNorm", "fwd+bwd at 32² and 64² vs copy, eager, compile",
                   f"≥ {fmt_pct(GOALS['gn_frac_copy'])}, ≥ {fmt_x(GOALS['gn_vs_eager'])}, ≥ {fmt_x(GOALS['gn_vs_compile'])}"),
                  ("DiTi loss", "speed-up over compile", f"≥ {fmt_x(GOALS['loss_vs_compile'])}"),
                  ("Attention", "sdpa over math at 16x16", f"≥ {fmt_x(GOALS['attn_sdpa_vs_math'])}"),
                  ("Sweep", "preset step over the original config's step, MFU",
                   f"≥ {fmt_x(GOALS['engine_speedup'])}, MFU ≥ {fmt_pct(GOALS['engine_mfu'])}"),
                  ("Engine", "images/s, preset vs original config", f"≥ {fmt_x(GOALS['engine_speedup'])}")]
        for area, metric, goal in wanted:
            if not any(r["area"] == area and r["met"] is not None for r in rows):
                rows.append(_row(area, "-", metric, "not measured (see summary.md)", goal, False))
    return rows


def _loss_row(label: str, what: str, cmp_: dict) -> list[dict]:
    """The loss-curve agreement of one compare_runs result, as a row (none when not compared)."""
    if "loss_rel_diff" not in cmp_:
        return []
    w = cmp_.get("loss_window", ["?", "?"])
    return [_row("Engine", label, f"{what}, steps {w[0]}-{w[1]} (mean)",
                 f"{cmp_['loss_mean_fast']:.4f} vs {cmp_['loss_mean_original']:.4f} "
                 f"({fmt_pct(cmp_['loss_rel_diff'])} apart)",
                 f"≤ {fmt_pct(cmp_.get('loss_match_tolerance', LOSS_MATCH_TOL))} apart",
                 cmp_["loss_curves_match"])]


def _sweep_case(r: dict) -> str:
    if r.get("original"):
        return f"batch {r['batch']}/GPU, original config (fp32, NCHW, math attention, unfused, eager)"
    return (f"batch {r['batch']}/GPU, {'channels_last' if r.get('channels_last') else 'NCHW'}, "
            f"{'CUDA graph' if r.get('cuda_graph') else 'eager'}, {'fused' if r.get('fused', True) else 'unfused'}")


def sweep_rows(sweep: dict | None, ceil: dict) -> list[dict]:
    """The step sweep: images/s per row, the MFU (model FLOPs per image × images/s over the
    measured bf16 matmul rate) of the bf16 rows, the preset over the original's configuration and
    the CUDA graph + channels_last over eager NCHW, per batch; failed or cut rows say so."""
    if not sweep or not sweep.get("runs"):
        return []
    rows = []
    fpi = sweep.get("flops_per_image")
    peak = ((ceil.get("matmul") or {}).get("bf16") or {}).get("TFLOPs")
    if fpi:
        name = Path(sweep.get("config") or "celeba64").stem
        rows.append(_row("Sweep", f"{name} DiTi step, fwd+bwd", "model FLOPs per image", f"{fpi / 1e9:.1f} GFLOP"))
    runs = sweep["runs"]
    for batch in sorted({r["batch"] for r in runs}):
        here = [r for r in runs if r["batch"] == batch]
        timed = [r for r in here if r.get("images_per_s")]
        preset = next((r for r in timed if not r.get("original") and r.get("channels_last") and r.get("cuda_graph")
                       and r.get("fused", True)), None)
        original = next((r for r in timed if r.get("original")), None)
        eager_nchw = next((r for r in timed if not r.get("original") and not r.get("channels_last")
                           and not r.get("cuda_graph") and r.get("fused", True)), None)
        for r in timed:
            text = f"{fmt_num(r['images_per_s'])} img/s"
            mfu = r["images_per_s"] * fpi / (peak * 1e12) if fpi and peak and not r.get("original") else None
            if mfu is not None:
                text += f", MFU {fmt_pct(mfu)}"
            goal = r is preset and mfu is not None
            rows.append(_row("Sweep", _sweep_case(r), "images/s" + (", MFU vs bf16 matmul" if mfu is not None else ""),
                             text, f"MFU ≥ {fmt_pct(GOALS['engine_mfu'])}" if goal else "",
                             mfu >= GOALS["engine_mfu"] if goal else None))
        if preset and original:
            sp = preset["images_per_s"] / original["images_per_s"]
            rows.append(_row("Sweep", f"batch {batch}/GPU", "preset step over the original config's step",
                             f"{fmt_x(sp)} ({fmt_num(preset['images_per_s'])} vs {fmt_num(original['images_per_s'])} img/s)",
                             f"≥ {fmt_x(GOALS['engine_speedup'])}", sp >= GOALS["engine_speedup"]))
        if preset and eager_nchw:
            rows.append(_row("Sweep", f"batch {batch}/GPU", "CUDA graph + channels_last over eager NCHW",
                             fmt_x(preset["images_per_s"] / eager_nchw["images_per_s"])))
        for r in here:
            if not r.get("images_per_s"):
                why = r.get("error") or f"{r.get('status', '?')}, no timed interval"
                rows.append(_row("Sweep", _sweep_case(r), "images/s", f"failed: {why[:120]}", "", False))
    return rows


def kernel_timing_rows(data) -> list[dict]:
    """benchmarks/kernel_timing.py's JSON, informational rows: every timed entry that reports a
    bandwidth (GB/s), with its fraction of the copy bandwidth and host overhead when present."""
    if not isinstance(data, dict):
        return []
    entries = []
    for v in data.values():
        if isinstance(v, list):
            entries += [e for e in v if isinstance(e, dict)]
    rows = []
    label_keys = ("kernel", "name", "op", "preset", "shape", "layout", "dtype", "direction", "pass", "mode")
    for e in entries:
        gb = next((e[k] for k in e if "gbps" in k.lower() and isinstance(e[k], (int, float))), None)
        if gb is None:
            continue
        case = " ".join(str(e[k]) for k in label_keys if isinstance(e.get(k), (str, int)))
        text = f"{fmt_num(gb, 0)} GB/s"
        frac = next((e[k] for k in e if "copy" in k.lower() and "frac" in k.lower()
                     and isinstance(e[k], (int, float))), None)
        if frac is not None:
            text += f" ({fmt_pct(frac)} of copy)"
        host = next((e[k] for k in e if "host" in k.lower() and isinstance(e[k], (int, float))), None)
        if host is not None:
            text += f", host {host:g}"
        rows.append(_row("Kernel timing", case or "?", "bandwidth (CUDA graph)", text))
    return rows


def compile_rows(data) -> list[dict]:
    rows = []
    for r in (data or {}).get("runs") or []:
        case = f"{Path(str(data.get('config') or '?')).stem} + torch.compile, batch {r.get('batch')}"
        first = r.get("first_interval_s")
        text = (f"first {r.get('log_every')} steps {first:.1f} s (compilation included)" if first
                else f"{r.get('status')}: no interval finished")
        if r.get("images_per_s"):
            text += f"; then {fmt_num(r['images_per_s'])} img/s"
        rows.append(_row("Compile", case, "cold compile, steady images/s", text))
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "_No measurements in these results._\n"
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| area | case | metric | measured | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['area']} | {r['case']} | {r['metric']} | {r['measured']} | {r['goal']} | {mark[r['met']]} |")
    return "\n".join(lines) + "\n"


def load_results(directory: Path) -> dict:
    d = Path(directory)
    env = load_json(d / "env.json")
    # gpu_check keeps the kernel tests' summary in env.json; a kernel_tests.json of its own wins.
    kt = load_json(d / "kernel_tests.json") or (env or {}).get("kernel_tests")
    return {"env": env, "ceilings": load_json(d / "ceilings.json"),
            "kernel_tests": kt, "bench": load_json(d / "bench_kernels.json"),
            "engine": load_json(d / "engine.json"), "sweep": load_json(d / "sweep.json"),
            "kernels": load_json(d / "kernels.json"), "compile": load_json(d / "compile.json")}




def summarise_run(records: list[dict], warmup_steps: int = ENGINE_WARMUP_STEPS) -> dict:
    """Throughput, compile-inclusive first interval, peak memory and the loss curve of one run.

    Each metrics record covers the steps since the previous one: its images / its images_per_s is
    that interval's wall time. Steady state = the intervals starting at or after ``warmup_steps``
    (all but the first when the run stopped before that)."""
    recs = [r for r in records if r.get("images_per_s") and r.get("step")]
    if not recs:
        return {"steps_done": 0}
    intervals = []
    prev_step, prev_images = 0, 0
    for r in recs:
        img = r["images"] - prev_images
        intervals.append({"start": prev_step, "end": r["step"], "images": img, "s": img / r["images_per_s"]})
        prev_step, prev_images = r["step"], r["images"]
    steady = [i for i in intervals if i["start"] >= warmup_steps] or intervals[1:] or intervals
    return {
        "steps_done": recs[-1]["step"],
        "images_per_s_steady": sum(i["images"] for i in steady) / sum(i["s"] for i in steady),
        "steady_from_step": steady[0]["start"],
        "images_per_s_all": sum(i["images"] for i in intervals) / sum(i["s"] for i in intervals),
        "first_interval_s": intervals[0]["s"],
        "first_interval_steps": intervals[0]["end"],
        "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0) for r in recs),
        "loss_curve": [[r["step"], r.get("loss")] for r in recs],
    }


def compare_runs(fast: dict, original: dict, total_steps: int) -> dict:
    """Speed-up, memory ratio and loss-curve agreement (second half of the shared steps)."""
    out: dict = {}
    if fast.get("images_per_s_steady") and original.get("images_per_s_steady"):
        out["speedup"] = fast["images_per_s_steady"] / original["images_per_s_steady"]
    if fast.get("peak_memory_bytes") and original.get("peak_memory_bytes"):
        out["peak_memory_ratio"] = fast["peak_memory_bytes"] / original["peak_memory_bytes"]
    a = {s: v for s, v in fast.get("loss_curve", []) if v is not None and math.isfinite(v)}
    b = {s: v for s, v in original.get("loss_curve", []) if v is not None and math.isfinite(v)}
    shared = sorted(set(a) & set(b))
    if shared:
        half = max(shared) / 2
        late = [s for s in shared if s > half] or shared
        ma, mb = sum(a[s] for s in late) / len(late), sum(b[s] for s in late) / len(late)
        every = shared[1] - shared[0] if len(shared) > 1 else shared[0]
        out["loss_window"] = [late[0] - every + 1, late[-1]]
        out["loss_mean_fast"], out["loss_mean_original"] = ma, mb
        out["loss_rel_diff"] = abs(ma - mb) / abs(mb) if mb else float("inf")
        out["loss_max_interval_rel_diff"] = max(abs(a[s] - b[s]) / abs(b[s]) for s in shared if b[s])
        out["loss_curves_match"] = out["loss_rel_diff"] <= LOSS_MATCH_TOL
        out["loss_match_tolerance"] = LOSS_MATCH_TOL
        out["complete"] = max(shared) >= total_steps
    return out
