"""benchmarks/gpu_check.py and benchmarks/plot_results.py on a CPU machine.

The device run itself needs a GPU; what CI can check is that the prepared script starts in a
checkout that is not installed (dry run: plan + environment check, diti_fast.kernels through the
generated shim), and that results JSON turns into figures and a table with the same numbers.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(REPO / "benchmarks"))  # gpucheck/ is a folder of plain modules beside the scripts
from gpucheck import children, kernel_tests, results, settings  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pr = _load("plot_results")


def _fresh_copy(dst: Path) -> Path:
    """The parts of the checkout the dry run reads, copied elsewhere (not installed there)."""
    skip = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for d in ("diti_fast", "kernels", "benchmarks", "configs", "data_shards"):
        if (REPO / d).is_dir():
            shutil.copytree(REPO / d, dst / d, ignore=skip)
    (dst / "tests").mkdir()
    for t in settings.KERNEL_TESTS:
        if (REPO / t).is_file():
            shutil.copy2(REPO / t, dst / t)
    return dst


def test_dry_run_in_an_uninstalled_copy_prints_the_plan_and_the_environment(tmp_path):
    copy = _fresh_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    run = subprocess.run([sys.executable, str(copy / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=copy,
                         env=env, capture_output=True, text=True, timeout=240)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    # the plan: every phase, its output file and the engine's two configurations
    for phase, fname in settings.OUTPUTS.items():
        assert fname in out, fname
    assert "configs/celeba64_original.yaml" in out and "configs/celeba64.yaml" in out and "run.precision=fp32" in out
    assert f"{settings.ENGINE_STEPS} steps" in out and "summary.md" in out
    # the environment check: versions, CUDA, packages, and the code under test from the copy. The
    # venv's editable install maps diti_fast.kernels to the original checkout; only the shim can
    # make it resolve inside the copy.
    assert "CUDA available:" in out and "packages found:" in out and "packages missing:" in out
    assert f"import diti_fast.kernels: {copy / 'kernels' / '__init__.py'} [this checkout]" in out
    assert f"import diti_fast: {copy / 'diti_fast' / '__init__.py'} [this checkout]" in out
    assert "phase engine:" in out
    assert not (copy / "benchmarks" / "results").exists()  # a dry run writes nothing


def test_the_shim_maps_kernels_and_chains_to_a_shadowed_sitecustomize(tmp_path):
    shim = children.write_shim(tmp_path / "shim")
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins._chained_site_ran = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(other), str(REPO)]))
    code = ("import builtins, diti_fast.kernels as k; "
            "print(k.__file__); print(getattr(builtins, '_chained_site_ran', False))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    file, chained = run.stdout.split()
    assert Path(file) == REPO / "kernels" / "__init__.py"
    assert chained == "True"


# ------------------------------------------------------------------------------ synthetic results

def _bench(fullname_file, name, params, median, **extra):
    return {"group": None, "name": name, "fullname": f"benchmarks/{fullname_file}::{name}", "params": params,
            "param": "-".join(map(str, params.values())), "extra_info": extra, "options": {},
            "stats": {"median": median, "mean": median, "min": median, "max": median, "rounds": 5}}


AGN = "bench_fused_norm.py"
LOSS = "bench_fused_loss.py"
ATTN = "bench_attention.py"


def _write_results(d: Path) -> dict:
    """A small results directory as gpu_check writes it; returns the numbers the table must show."""
    d.mkdir(parents=True)
    copy = 4300.0
    env = {"cuda": True, "device": {"name": "NVIDIA H200"}, "torch": "2.11.0+cu130", "python": "3.12.3",
           "started": "2026-12-01T10:00:00+00:00", "command": "bash benchmarks/gpu_check.sh", "packages": {}}
    ceil = {"device": "NVIDIA H200", "copy_GBps": copy,
            "matmul": {"bf16": {"n": 8192, "median_s": 0.0014, "TFLOPs": 785.25}}}
    kt = {"status": "ok", "compiled": True, "totals": {"passed": 120, "failed": 0, "error": 0, "skipped": 3, "total": 123},
          "failures": []}
    b = []
    # GroupNorm C256_32x32 bf16 fwd_bwd: eager 300us, compile 130us, triton 80us at 3612 GB/s (0.84 of copy)
    for v, t in (("eager", 300e-6), ("compile", 130e-6), ("triton", 80e-6)):
        p = {"shape": "C256_32x32", "dtype": "bf16", "mode": "fwd_bwd", "variant": v}
        extra = {"min_traffic_GBps": 3612.0 if v == "triton" else 1000.0, "copy_GBps": copy}
        if v == "triton":
            extra["fraction_of_copy"] = 3612.0 / copy
        b.append(_bench(AGN, f"test_adaptive_group_norm[{v}]", p, t * 20, **extra))
    # C128_64x64: just under every GroupNorm goal (70 % of copy, 2.90x eager, 1.25x compile)
    for v, t in (("eager", 290e-6), ("compile", 125e-6), ("triton", 100e-6)):
        p = {"shape": "C128_64x64", "dtype": "bf16", "mode": "fwd_bwd", "variant": v}
        extra = {"min_traffic_GBps": 3010.0 if v == "triton" else 1000.0, "copy_GBps": copy}
        if v == "triton":
            extra["fraction_of_copy"] = 3010.0 / copy
        b.append(_bench(AGN, f"test_adaptive_group_norm[64-{v}]", p, t * 20, **extra))
    for v, t in (("eager", 90e-6), ("compile", 50e-6), ("triton", 40e-6)):
        b.append(_bench(AGN, f"test_adaptive_group_norm[fwd-{v}]",
                        {"shape": "C256_32x32", "dtype": "bf16", "mode": "fwd", "variant": v}, t * 20,
                        min_traffic_GBps=2000.0))
    for v, t in (("eager", 100e-6), ("compile", 50e-6), ("compile_loss_only", 45e-6), ("triton", 40e-6)):
        b.append(_bench(LOSS, f"test_diti_loss_fwd_bwd[{v}]", {"shape": "64px", "dtype": "bf16", "variant": v},
                        t * 20, min_traffic_GBps=1500.0))
    # 128px: just under the loss goal (1.15x compile)
    for v, t in (("eager", 200e-6), ("compile", 115e-6), ("triton", 100e-6)):
        b.append(_bench(LOSS, f"test_diti_loss_fwd_bwd[128-{v}]", {"shape": "128px", "dtype": "bf16", "variant": v},
                        t * 20, min_traffic_GBps=1500.0))
    # scope "attn" meets the attention goal (4x), scope "block" misses it (2.9x)
    for scope, times in (("attn", (("math", 8e-3), ("sdpa", 2e-3))), ("block", (("math", 5.8e-3), ("sdpa", 2e-3)))):
        for backend, t in times:
            b.append(_bench(ATTN, f"test_attention_fwd_bwd[{scope}-{backend}]",
                            {"level": "celeba64-16x16", "scope": scope, "dtype": "bf16", "new_order": False,
                             "backend": backend}, t * 10))
    bench = {"machine_info": {}, "commit_info": {}, "benchmarks": b, "datetime": "2026-12-01", "version": "5.3.1"}
    curve_o = [[s, 0.50 - s / 1000] for s in range(10, 201, 10)]
    curve_f = [[s, v * 1.01] for s, v in curve_o]
    eng = {"steps": 200, "batch": 128, "device": "NVIDIA H200", "log_every": 10, "runs": {
        "original": {"status": "ok", "steps_done": 200, "images_per_s_steady": 345.6, "peak_memory_bytes": 20 * 2 ** 30,
                     "loss_curve": curve_o},
        "fast": {"status": "ok", "steps_done": 200, "images_per_s_steady": 1234.5, "peak_memory_bytes": 12 * 2 ** 30,
                 "loss_curve": curve_f}}}
    eng["runs"]["fast_fp32"] = {"status": "ok", "steps_done": 200, "images_per_s_steady": 691.2,
                                "peak_memory_bytes": 16 * 2 ** 30, "loss_curve": curve_o}
    eng["comparison"] = results.compare_runs(eng["runs"]["fast"], eng["runs"]["original"], 200)
    eng["comparison_fp32"] = results.compare_runs(eng["runs"]["fast_fp32"], eng["runs"]["original"], 200)
    fpi = 91.3e9
    sweep = {"flops_per_image": fpi, "runs": [
        {"batch": 16, "channels_last": False, "cuda_graph": False, "images_per_s": 1000.0},
        {"batch": 16, "channels_last": True, "cuda_graph": True, "images_per_s": 2500.0},
        {"batch": 32, "channels_last": True, "cuda_graph": True, "error": "OutOfMemoryError: boom"}]}
    for name, obj in (("env", env), ("ceilings", ceil), ("kernel_tests", kt), ("bench_kernels", bench),
                      ("engine", eng), ("sweep", sweep)):
        (d / f"{name}.json").write_text(json.dumps(obj))
    late = [s for s, _ in curve_o if s > 100]
    mo = sum(v for s, v in curve_o if s > 100) / len(late)
    mf = sum(v for s, v in curve_f if s > 100) / len(late)
    # Expected cells, computed here from the numbers above (not through gpu_check's formatting).
    return {
        "copy": "4,300 GB/s", "bf16": "785.2 TFLOP/s", "tests": "120 / 0 / 3",
        "gn_frac": f"{100 * 3612.0 / copy:.1f}% (3,612 GB/s)", "gn_eager": f"{300 / 80:.2f}×",
        "gn_compile": f"{130 / 80:.2f}×", "loss": f"{50 / 40:.2f}×", "attn": f"{8 / 2:.2f}×",
        "engine": f"{1234.5 / 345.6:.2f}× (1,234.5 vs 345.6 img/s)", "mem": "12.00 GiB vs 20.00 GiB",
        "loss_curve": f"{mf:.4f} vs {mo:.4f} ({100 * abs(mf - mo) / mo:.1f}% apart)",
        "engine_fp32": f"{691.2 / 345.6:.2f}× (691.2 vs 345.6 img/s)",
        "sweep_16": f"2,500.0 img/s, MFU {100 * 2500 * fpi / 785.25e12:.1f}%",
        "sweep_gain": f"{2500 / 1000:.2f}×", "gflop": "91.3 GFLOP",
    }


def _table_rows(doc_text: str) -> dict[tuple[str, str], list[str]]:
    body = doc_text.split(pr.START, 1)[1].split(pr.END, 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("area", "---"):
            rows[(cells[0], cells[2])] = cells
    return rows


def _all_rows(doc_text: str) -> dict[tuple[str, str, str], list[str]]:
    """The table's rows keyed by (area, case, metric)."""
    body = doc_text.split(pr.START, 1)[1].split(pr.END, 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("area", "---"):
            rows[(cells[0], cells[1], cells[2])] = cells
    return rows


def test_plots_and_table_from_a_results_directory(tmp_path):
    res_dir = tmp_path / "results" / "2026-12-01-nvidia-h200"
    want = _write_results(res_dir)
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nintro stays\n\n{pr.START}\nold table\n{pr.END}\n\ntail stays\n")
    assert pr.main(["--results-root", str(tmp_path / "results"), "--doc", str(doc)]) == 0
    for png in ("bandwidth.png", "speedups.png", "engine.png"):
        data = (res_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    text = doc.read_text()
    assert "intro stays" in text and "tail stays" in text and "old table" not in text
    assert "NVIDIA H200" in text and "2026-12-01" in text and "`bash benchmarks/gpu_check.sh`" in text
    rows = _table_rows(text)
    cell = lambda area, metric: rows[(area, metric)][3]  # noqa: E731
    assert cell("Ceiling", "bandwidth (read+write)") == want["copy"]
    assert cell("Ceiling", "rate") == want["bf16"]
    assert cell("Kernel tests", "passed / failed / skipped") == want["tests"]
    assert cell("GroupNorm", "fraction of copy bandwidth") == want["gn_frac"]
    assert cell("GroupNorm", "speed-up over eager") == want["gn_eager"]
    assert cell("GroupNorm", "speed-up over compile") == want["gn_compile"]
    assert cell("DiTi loss", "speed-up over compile") == want["loss"]
    assert _all_rows(text)[("Attention", "celeba64-16x16 attn bf16", "sdpa over math")][3] == want["attn"]
    assert cell("Engine", "images/s, preset vs original config") == want["engine"]
    assert cell("Engine", "peak memory, preset vs original") == want["mem"]
    assert cell("Engine", "loss, steps 101-200 (mean)") == want["loss_curve"]
    assert cell("Engine", "images/s, fp32 preset vs original config (both fp32)") == want["engine_fp32"]
    assert cell("Sweep", "model FLOPs per image") == want["gflop"]
    assert cell("Sweep", "CUDA graph + channels_last over eager NCHW") == want["sweep_gain"]
    sweep_cells = [ln for ln in text.splitlines() if ln.startswith("| Sweep | batch 16/GPU, channels_last, CUDA graph")]
    assert len(sweep_cells) == 1 and want["sweep_16"] in sweep_cells[0]
    assert any("failed: OutOfMemoryError" in ln for ln in text.splitlines())
    met = {k: v[5] for k, v in rows.items()}
    assert met[("GroupNorm", "fraction of copy bandwidth")] == "yes"     # 84 % >= 80 %
    assert met[("GroupNorm", "speed-up over eager")] == "yes"            # 3.75 >= 3
    assert met[("GroupNorm", "speed-up over compile")] == "yes"          # 1.63 >= 1.3
    assert met[("Engine", "images/s, preset vs original config")] == "yes"
    assert met[("DiTi loss", "speed-up over compile")] == "yes"          # 1.25 >= 1.2
    # Every goal row against the goals the project states (docs/performance.md), written out here,
    # and the cases just under a goal marked as missing it.
    full = _all_rows(text)
    goal_met = lambda area, case, metric: tuple(full[(area, case, metric)][4:])  # noqa: E731
    gn32, gn64 = "C256_32x32 bf16 fwd+bwd", "C128_64x64 bf16 fwd+bwd"
    assert goal_met("GroupNorm", gn32, "fraction of copy bandwidth") == ("≥ 80.0%", "yes")
    assert goal_met("GroupNorm", gn64, "fraction of copy bandwidth") == ("≥ 80.0%", "**no**")   # 70 %
    assert goal_met("GroupNorm", gn32, "speed-up over eager") == ("≥ 3.00×", "yes")
    assert goal_met("GroupNorm", gn64, "speed-up over eager") == ("≥ 3.00×", "**no**")          # 2.90
    assert goal_met("GroupNorm", gn32, "speed-up over compile") == ("≥ 1.30×", "yes")
    assert goal_met("GroupNorm", gn64, "speed-up over compile") == ("≥ 1.30×", "**no**")        # 1.25
    assert goal_met("DiTi loss", "64px bf16 fwd+bwd", "speed-up over compile") == ("≥ 1.20×", "yes")
    assert goal_met("DiTi loss", "128px bf16 fwd+bwd", "speed-up over compile") == ("≥ 1.20×", "**no**")  # 1.15
    assert goal_met("Attention", "celeba64-16x16 attn bf16", "sdpa over math") == ("≥ 3.00×", "yes")
    assert goal_met("Attention", "celeba64-16x16 block bf16", "sdpa over math") == ("≥ 3.00×", "**no**")  # 2.90
    eng = "celeba64, 200 steps, batch 128"
    assert goal_met("Engine", eng, "images/s, preset vs original config") == ("≥ 3.00×", "yes")  # 3.57
    assert goal_met("Engine", eng, "loss, steps 101-200 (mean)") == ("≤ 5.0% apart", "yes")       # 1 %
    # MFU of the best configuration: 2,500 img/s x 91.3 GFLOP / 785.25 TFLOP/s = 29.1 % < 35 %
    assert goal_met("Sweep", "batch 16/GPU, channels_last, CUDA graph", "images/s, MFU vs bf16 matmul") == (
        "MFU ≥ 35.0%", "**no**")
    # rerunning rewrites the block in place
    assert pr.main(["--results-root", str(tmp_path / "results"), "--doc", str(doc), "--no-figures"]) == 0
    assert doc.read_text().count(pr.START) == 1


def test_without_gpu_results_the_table_says_so_and_shows_cpu_results(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    doc = tmp_path / "performance.md"
    assert pr.main(["--results-root", str(root), "--doc", str(doc), "--no-figures"]) == 0
    text = doc.read_text()
    assert "No GPU results are committed yet" in text and "No CPU benchmark results" in text
    cpu = [_bench(LOSS, f"t[{v}]", {"shape": "64px", "dtype": "fp32", "variant": v}, t, device="cpu")
           for v, t in (("eager", 0.02), ("compile", 0.008))]
    cpu += [_bench(ATTN, f"a[{b}]", {"level": "celeba64-16x16", "scope": "block", "dtype": "fp32",
                                      "new_order": False, "backend": b}, t, device="cpu")
            for b, t in (("math", 0.03), ("sdpa", 0.02))]
    (root / "cpu-2026-11-29.json").write_text(json.dumps({"benchmarks": cpu, "datetime": "2026-11-29T12:00:00",
                                                          "machine_info": {"cpu": {"brand_raw": "Test CPU"}}}))
    assert pr.main(["--results-root", str(root), "--doc", str(doc), "--no-figures"]) == 0
    text = doc.read_text()
    assert "No GPU results are committed yet" in text and "Test CPU" in text
    rows = _table_rows(text)
    assert rows[("DiTi loss", "compile over eager")][3] == f"{0.02 / 0.008:.2f}×"
    assert rows[("Attention", "sdpa over math")][3] == f"{0.03 / 0.02:.2f}×"
    assert all(r[5] == "" for r in rows.values())  # no goal is claimed from CPU numbers


def test_engine_throughput_excludes_the_compile_interval_and_loss_curves_are_compared():
    # 10-step intervals of batch 128: the first takes 60 s (compilation), later ones 1 s each.
    recs = []
    for i, s in enumerate(range(10, 201, 10)):
        secs = 60.0 if i == 0 else 1.0
        recs.append({"step": s, "images": s * 128, "images_per_s": 1280 / secs, "loss": 0.3,
                     "peak_memory_bytes": 1000 + s})
    summ = results.summarise_run(recs)
    assert summ["steps_done"] == 200 and summ["steady_from_step"] == 50
    assert summ["images_per_s_steady"] == pytest.approx(1280.0)
    assert summ["first_interval_s"] == pytest.approx(60.0)
    assert summ["peak_memory_bytes"] == 1200
    other = dict(summ, loss_curve=[[s, 0.3 * 1.2] for s, _ in summ["loss_curve"]])
    cmp_ = results.compare_runs(summ, other, 200)
    assert cmp_["loss_window"] == [101, 200]
    assert cmp_["loss_rel_diff"] == pytest.approx(1 / 6) and cmp_["loss_curves_match"] is False
    assert results.compare_runs(summ, summ, 200)["loss_curves_match"] is True
    assert results.compare_runs(summ, summ, 400)["complete"] is False


def test_killed_pytest_output_is_still_counted():
    log = ("tests/test_a.py::test_x[1] PASSED   [ 10%]\n"
           "[gw1] [ 20%] FAILED tests/test_a.py::test_y\n"
           "tests/test_b.py::test_z SKIPPED (needs CUDA)   [ 30%]\n")
    s = kernel_tests.parse_verbose_log(log)
    assert s["totals"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "total": 3}
    assert s["failures"] == [{"test": "tests/test_a.py::test_y", "kind": "failed"}]


def test_on_a_gpu_every_goal_without_a_measurement_is_a_failed_row():
    rows = results.goal_rows({"env": {"cuda": True}})
    missing = {r["area"]: r for r in rows}
    assert set(missing) == {"Kernel tests", "GroupNorm", "DiTi loss", "Attention", "Engine"}
    assert all(r["met"] is False and r["measured"].startswith("not measured") for r in rows)
