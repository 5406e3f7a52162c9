#!/usr/bin/env python3
"""Figures and the docs "Performance" table from gpu_check results.

    python benchmarks/plot_results.py                      # newest results under benchmarks/results/
    python benchmarks/plot_results.py benchmarks/results/2026-12-01-nvidia-h200
    python benchmarks/plot_results.py RESULTS --doc docs/performance.md --no-figures

RESULTS is a directory written by ``benchmarks/gpu_check.py`` on a GPU (env.json, ceilings.json,
sweep.json, kernels.json, engine.json, compile.json; the kernel tests inside env.json) or a plain pytest-benchmark
JSON file (what ``make bench`` writes on a CPU); gpu_check's CPU rehearsals are never taken. Without an argument the newest GPU results directory is used; if
there is none, the table says so and shows the newest CPU results instead.

Figures (PNG, next to the results): ``bandwidth.png`` (adaptive GroupNorm and loss GB/s per shape
against the measured copy bandwidth), ``speedups.png`` (fused kernels over eager and
torch.compile, sdpa over math, with the goals), ``engine.png`` (images/s, peak memory and the loss
curves of the preset and the original configuration). The table between the markers
``<!-- perf-table:start -->`` / ``<!-- perf-table:end -->`` of ``docs/performance.md`` is rewritten;
its numbers come from the same analysis as gpu_check's summary.md (``gpucheck/results.py``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpucheck import results as analysis  # noqa: E402  (gpucheck/ beside this file; pure Python, no torch)
from gpucheck.settings import GOALS, OUTPUTS, REPO  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "performance.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


# ============================================================================ finding results

def is_results_dir(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in OUTPUTS.values())


def is_rehearsal(p: Path) -> bool:
    env = analysis.load_json(p / "env.json") or {}
    return bool(env.get("rehearsal")) or not env.get("cuda")


def is_bench_json(p: Path) -> bool:
    if p.suffix != ".json" or not p.is_file():
        return False
    data = analysis.load_json(p)
    return isinstance(data, dict) and "benchmarks" in data


def load_any(path: Path) -> dict:
    """gpu_check's result dict for a results directory or a bare pytest-benchmark JSON."""
    if path.is_dir():
        return analysis.load_results(path)
    bench = analysis.load_json(path)
    env = {"cuda": False, "device": {"name": "cpu"}}
    mi = (bench or {}).get("machine_info") or {}
    if mi:
        env["device"] = {"name": (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "cpu"}
        env["python"] = mi.get("python_version")
    # make bench names its files cpu-<date>.json; a CUDA run of the bench files would say so in extra_info
    devices = {str((b.get("extra_info") or {}).get("device", "")) for b in (bench or {}).get("benchmarks", [])}
    if any(d.startswith("cuda") or "NVIDIA" in d for d in devices):
        env["cuda"] = True
    env["started"] = (bench or {}).get("datetime")
    return {"env": env, "bench": bench, "ceilings": None, "kernel_tests": None, "engine": None}


def is_gpu(res: dict) -> bool:
    return bool((res.get("env") or {}).get("cuda"))


def sort_key(p: Path) -> tuple:
    m = _DATE.search(p.name)
    return (m.group(1) if m else "", p.stat().st_mtime)


def find_latest(root: Path = RESULTS) -> tuple[Path | None, Path | None]:
    """(newest GPU results, newest CPU results) under ``root``; either may be None."""
    if not root.is_dir():
        return None, None
    # A gpu_check CPU rehearsal (--allow-cpu) tests the script and measures nothing: never a result.
    cands = [p for p in root.iterdir() if (is_results_dir(p) and not is_rehearsal(p)) or is_bench_json(p)]
    gpu = [p for p in cands if is_gpu(load_any(p))]
    cpu = [p for p in cands if p not in gpu]
    pick = lambda xs: max(xs, key=sort_key) if xs else None  # noqa: E731
    return pick(gpu), pick(cpu)


# ============================================================================ figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
    import matplotlib.pyplot as plt
    return plt


def _shape_order(shape: str) -> tuple:
    m = re.match(r"C(\d+)_(\d+)x", shape)
    return (-int(m.group(2)), int(m.group(1))) if m else (0, 0)


def plot_bandwidth(res: dict, out: Path) -> Path | None:
    """GB/s over the minimum traffic per shape, against the measured copy bandwidth."""
    entries = analysis.bench_entries(res.get("bench"))
    agn = analysis.bench_groups(entries, "bench_fused_norm.py", "variant")
    loss = analysis.bench_groups(entries, "bench_fused_loss.py", "variant")
    if not agn and not loss:
        return None
    copy = (res.get("ceilings") or {}).get("copy_GBps")
    if copy is None:
        copies = [e["extra"].get("copy_GBps") for e in entries if e["extra"].get("copy_GBps")]
        copy = copies[0] if copies else None
    plt = _plt()
    panels = [("fwd", agn), ("fwd_bwd", agn), ("loss", loss)]
    panels = [(m, g) for m, g in panels if g]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (mode, groups) in zip(axes[0], panels):
        if mode == "loss":
            keys = sorted(groups, key=lambda k: (dict(k)["dtype"], dict(k)["shape"]))
            labels = [f"{dict(k)['shape']}\n{dict(k)['dtype']}" for k in keys]
            variants = ["eager", "compile", "compile_loss_only", "triton", "compile_triton"]
            gb = lambda e: e["extra"].get("min_traffic_GBps")  # noqa: E731
            title = "DiTi loss fwd+bwd"
        else:
            keys = sorted((k for k in groups if dict(k)["mode"] == mode),
                          key=lambda k: (dict(k)["dtype"], _shape_order(dict(k)["shape"])))
            labels = [f"{dict(k)['shape'].replace('_', ' ')}\n{dict(k)['dtype']}" for k in keys]
            variants = ["eager", "compile", "triton"]
            gb = lambda e: e["extra"].get("min_traffic_GBps")  # noqa: E731
            title = f"adaptive GroupNorm+SiLU {mode.replace('_', '+')} (batch 64)"
        xs = range(len(keys))
        for v in variants:
            ys = [gb(groups[k][v]) if v in groups[k] and gb(groups[k][v]) else float("nan") for k in keys]
            if any(y == y for y in ys):
                ax.plot(list(xs), ys, marker="o", label=v)
        if copy:
            ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy {copy:,.0f} GB/s")
            if mode == "fwd_bwd":
                ax.axhline(GOALS["gn_frac_copy"] * copy, color="k", ls=":", lw=1,
                           label=f"goal {GOALS['gn_frac_copy']:.0%} of copy")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("GB/s over minimum traffic")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "bandwidth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_bars(res: dict) -> list[tuple[str, list[tuple[str, float]], float | None]]:
    """[(panel title, [(label, ratio)], goal)] for the speed-up figure."""
    entries = analysis.bench_entries(res.get("bench"))
    panels = []
    agn = analysis.bench_groups(entries, "bench_fused_norm.py", "variant")
    for base, goal in (("eager", "gn_vs_eager"), ("compile", "gn_vs_compile")):
        bars = []
        for k in sorted(agn, key=lambda k: (dict(k)["mode"], dict(k)["dtype"], _shape_order(dict(k)["shape"]))):
            p, g = dict(k), agn[k]
            r = analysis.ratio(g.get(base), g.get("triton"))
            if r:
                bars.append((f"{p['shape']} {p['dtype']} {p['mode']}", r))
        if bars:
            panels.append((f"GroupNorm+SiLU: Triton over {base}\n(goal for fwd_bwd at 32², 64²)", bars,
                           GOALS[goal]))
    loss = analysis.bench_groups(entries, "bench_fused_loss.py", "variant")
    bars = []
    for k in sorted(loss, key=lambda k: (dict(k)["dtype"], dict(k)["shape"])):
        p, g = dict(k), loss[k]
        for fast in ("triton", "compile_triton"):
            for base in ("compile", "compile_loss_only"):
                r = analysis.ratio(g.get(base), g.get(fast))
                if r:
                    bars.append((f"{p['shape']} {p['dtype']} {fast} vs {base}", r))
        if not any(v in g for v in ("triton", "compile_triton")):
            r = analysis.ratio(g.get("eager"), g.get("compile"))
            if r:
                bars.append((f"{p['shape']} {p['dtype']} compile vs eager", r))
    if bars:
        panels.append(("DiTi loss", bars, GOALS["loss_vs_compile"] if is_gpu(res) else None))
    attn = analysis.bench_groups(entries, "bench_attention.py", "backend")
    bars = []
    for k in sorted(attn, key=lambda k: (dict(k)["level"], dict(k)["scope"], dict(k)["dtype"], dict(k)["new_order"])):
        p, g = dict(k), attn[k]
        for fast in ("sdpa", "xformers"):
            r = analysis.ratio(g.get("math"), g.get(fast))
            if r:
                order = "new" if p["new_order"] == "True" else "legacy"
                bars.append((f"{p['level']} {p['scope']} {p['dtype']} {order} {fast}", r))
    if bars:
        panels.append(("Attention: over math", bars, GOALS["attn_sdpa_vs_math"] if is_gpu(res) else None))
    return panels


def plot_speedups(res: dict, out: Path) -> Path | None:
    panels = speedup_bars(res)
    if not panels:
        return None
    plt = _plt()
    height = max(3.0, 0.22 * max(len(b) for _, b, _ in panels) + 1.2)
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.0 * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, bars, goal) in zip(axes.flat, panels):
        labels, vals = zip(*bars)
        ys = range(len(bars))
        ax.barh(list(ys), vals, color=["tab:green" if goal and v >= goal else "tab:blue" for v in vals])
        ax.set_yticks(list(ys), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        if goal:
            ax.axvline(goal, color="tab:red", ls="--", lw=1, label=f"goal {goal:g}×")
            ax.legend(fontsize=7)
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:.2f}×", va="center", fontsize=6)
        ax.set_xlabel("speed-up (median time ratio)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "speedups.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_engine(res: dict, out: Path) -> Path | None:
    eng = res.get("engine") or {}
    runs = {k: v for k, v in (eng.get("runs") or {}).items() if v.get("images_per_s_steady")}
    if not runs:
        return None
    plt = _plt()
    order = [k for k in ("original", "fast_fp32", "fast") if k in runs]
    names = {"original": "original config\nfp32, eager,\nmath, unfused", "fast": "preset\nbf16, compiled,\nsdpa, fused",
             "fast_fp32": "preset in fp32\ncompiled,\nsdpa, fused"}
    colours = {"original": "tab:gray", "fast_fp32": "tab:blue", "fast": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ips = [runs[k]["images_per_s_steady"] for k in order]
    axes[0].bar([names[k] for k in order], ips, color=[colours[k] for k in order])
    for i, v in enumerate(ips):
        axes[0].text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    if "fast" in runs and "original" in runs:
        axes[0].set_title(f"images/s (steady state): {runs['fast']['images_per_s_steady'] / ips[0]:.2f}× "
                          f"(goal {GOALS['engine_speedup']:g}×)", fontsize=9)
    axes[0].set_ylabel("images/s")
    mem = [runs[k].get("peak_memory_bytes", 0) / 2 ** 30 for k in order]
    axes[1].bar([names[k] for k in order], mem, color=[colours[k] for k in order])
    axes[1].set_ylabel("peak memory (GiB)")
    axes[1].set_title("peak device memory", fontsize=9)
    for k in order:
        curve = [(s, v) for s, v in runs[k].get("loss_curve", []) if v is not None]
        if curve:
            axes[2].plot(*zip(*curve), marker=".", label=names[k].replace("\n", " "))
    axes[2].set_xlabel("step")
    axes[2].set_ylabel(f"loss (mean over {eng.get('log_every', '?')} steps)")
    axes[2].set_title(f"loss curves, {eng.get('steps', '?')} steps, batch {eng.get('batch', '?')}", fontsize=9)
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"engine on {eng.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    path = out / "engine.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (plot_bandwidth(res, out), plot_speedups(res, out), plot_engine(res, out)) if p]


# ============================================================================ the docs table

def _rel(path: Path, doc: Path) -> str:
    return Path(os.path.relpath(path.resolve(), doc.resolve().parent)).as_posix()


def _header(res: dict, source: Path, doc: Path) -> list[str]:
    env = res.get("env") or {}
    date = env.get("started") or "?"
    dev = (env.get("device") or {}).get("name", "?")
    cmd = env.get("command") or ("make bench" if source.is_file() else "bash benchmarks/gpu_check.sh")
    soft = ", ".join(x for x in (f"torch {env['torch']}" if env.get("torch") else "",
                                 f"python {env['python']}" if env.get("python") else "") if x)
    return [f"- results: [`{_rel(source, REPO)}`]({_rel(source, doc)})",
            f"- date: {date}; device: {dev}" + (f"; {soft}" if soft else ""),
            f"- reproduce: `{cmd}`" + (" (on the GPU machine: see *Running it* below)" if is_gpu(res) else "")]


def render_table(gpu: Path | None, cpu: Path | None, doc: Path, figures: list[Path] | None = None) -> str:
    """The text between the markers."""
    out = ["", "_Generated by `python benchmarks/plot_results.py` from the newest results under "
               "`benchmarks/results/`; edit the script, not this table._", ""]
    if gpu is not None:
        res = load_any(gpu)
        out += _header(res, gpu, doc) + ["", analysis.rows_to_markdown(analysis.goal_rows(res)).rstrip()]
        if figures:
            out += [""] + [f"![{p.stem}]({_rel(p, doc)})" for p in figures]
    else:
        out += ["**No GPU results are committed yet.** `benchmarks/gpu_check.py` is ready: its dry run and "
                "a CPU rehearsal of every phase are tested in CI; the first session lent a GPU runs it "
                "(*Running it* below) and commits its results, which then replace this paragraph. None of "
                "the goals has been measured.", ""]
        if cpu is not None:
            res = load_any(cpu)
            out += ["CPU results that exist (ratios only: CPU timings say nothing about the GPU kernels, "
                    "and the Triton kernels are not timed on CPU):", ""]
            out += _header(res, cpu, doc) + ["", analysis.rows_to_markdown(analysis.goal_rows(res)).rstrip()]
        else:
            out += ["No CPU benchmark results are committed either (`make bench` writes them under "
                    "`benchmarks/results/`)."]
    return "\n".join(out) + "\n"


def update_doc(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.is_file() else "# Performance\n"
    block = f"{START}\n{body}{END}"
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        _, post = rest.split(END, 1)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", help="a gpu_check results directory or a pytest-benchmark JSON "
                                               "(default: the newest under benchmarks/results/)")
    ap.add_argument("--results-root", default=str(RESULTS), help="where to look for the newest results")
    ap.add_argument("--doc", default=str(DOC), help="the markdown file whose table is rewritten")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="figures only")
    args = ap.parse_args(argv)
    doc = Path(args.doc)
    if args.results:
        src = Path(args.results)
        if not (is_results_dir(src) or is_bench_json(src)):
            print(f"{src}: neither a gpu_check results directory nor a pytest-benchmark JSON", file=sys.stderr)
            return 2
        gpu, cpu = (src, None) if is_gpu(load_any(src)) else (None, src)
    else:
        gpu, cpu = find_latest(Path(args.results_root))
    figures: list[Path] = []
    if not args.no_figures:
        for src in (gpu, cpu):
            if src is not None:
                res = load_any(src)
                fig_dir = src if src.is_dir() else src.parent / f"{src.stem}-figures"
                made = make_figures(res, fig_dir)
                if src is gpu:
                    figures = made
                for p in made:
                    print(f"wrote {p}")
    if not args.no_doc:
        update_doc(doc, render_table(gpu, cpu, doc, figures))
        print(f"updated {doc} from {gpu or cpu or 'no results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
