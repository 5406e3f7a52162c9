"""The graph-safe step (engine/graph_step.py) against DeepSpeed's eager step of the same run.

Both run the one step body of engine/step.py, with different drivers (the graph-safe one: the
objective's own backward, the flat gradient all-reduce and fused Adam). On a CPU ``fast.cuda_graph=true`` runs the graph-safe step uncaptured: the static buffers, the
device-side sample indices, ``found_inf`` handed to fused Adam, the EMA weight computed on the
device, the meter inside the step. It must equal DeepSpeed's step bit for bit (module, EMA,
optimiser state, logged losses), including a skipped NaN step, EMA warm-up and gradient
accumulation. On a GPU (skipped here; run by benchmarks/gpu_check.sh) the captured graph must
equal the uncaptured step over 20 steps and still skip a NaN step inside the graph.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diti_fast.engine import graph_step, loop
from diti_fast.engine import step as step_module
from diti_fast.engine.graph_step import StepPlan, capture_blocker, plan_step
from diti_fast.engine.loop import train
from diti_fast.engine.config_files import apply_overrides, build_config
from test_train_engine import TINY as ENGINE_TINY

TINY = {
    # the engine tests' tiny model, with dropout on: its random stream must replay in the graph too
    "model": {**ENGINE_TINY["model"], "unet": {**ENGINE_TINY["model"]["unet"], "dropout": 0.1}},
    "stage": "ddpm",
    "run": {"threads": 1, "seed": 5, "device": "cpu"},  # the GPU tests ask for run.device=cuda
    "data": {"source": "fixed", "batch_size": 4, "num_workers": 0, "image_size": 16},
    "optim": {"lr": 1e-3, "lr_rule": "none"},
    "deepspeed": {"zero_stage": 0},
    "ema": {"decay": 0.99, "warmup": True},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 0},
}


def _cfg(run_dir: Path, *overrides: str):
    return build_config(apply_overrides(TINY, [f"run.dir={run_dir}", *overrides]), "test")


def _final_state(run_dir: Path) -> dict:
    """Module, EMA and optimiser state of the run's last checkpoint, and its logged losses."""
    ck = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    model = torch.load(ck / "model.pt", weights_only=True)
    opt = torch.load(ck / "rank-00000.pt", weights_only=True)["optimizer"]
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"model": model, "opt": opt, "losses": losses}


def _assert_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.parametrize("extra", [
    ["stage=ddpm", "ema.every=1"],
    ["stage=ddpm", "deepspeed.grad_accum=2", "ema.every=2", "fast.channels_last=true"],
], ids=["ddpm", "ddpm-accum2-ema-every2-channels-last"])
def test_the_graph_safe_step_equals_deepspeeds_step_bit_for_bit(tmp_path, extra, capsys, monkeypatch):
    # 6 steps with a NaN at step 3: the skip, the EMA warm-up and the device counters all act.
    common = ["run.device=cpu", "run.max_images=24", "debug.nan_at_steps=[3]", *extra]
    # Count the step bodies and their drivers: the comparison is only meaningful if both runs trained
    # through engine/step.py's one body, the first with DeepSpeed's driver, the second through
    # GraphStep (uncaptured) with the graph-safe driver.
    bodies, drivers = [], []
    body, shared = graph_step.GraphStep._body, step_module.StepBody.__call__
    monkeypatch.setattr(graph_step.GraphStep, "_body", lambda self: (bodies.append(self.capture), body(self))[1])
    monkeypatch.setattr(step_module.StepBody, "__call__",
                        lambda self, batch: (drivers.append(type(self.driver).__name__), shared(self, batch))[1])
    train(_cfg(tmp_path / "ds", "fast.cuda_graph=false", *common))
    assert bodies == [] and drivers == ["DeepSpeedDriver"] * 6
    ds = _final_state(tmp_path / "ds")
    drivers.clear()
    train(_cfg(tmp_path / "gs", "fast.cuda_graph=true", *common))
    assert "the graph-safe step runs uncaptured" in capsys.readouterr().out
    assert bodies == [False] * 6  # one uncaptured graph-safe step per optimiser step
    assert drivers == ["GraphSafeDriver"] * 6
    gs = _final_state(tmp_path / "gs")
    _assert_equal(gs, ds)
    # the NaN step was skipped: 5 Adam updates in 6 steps, its loss logged as missing
    steps = {int(v["step"]) for v in gs["opt"]["state"].values()}
    assert steps == {5}
    assert gs["losses"][2] != gs["losses"][2] and all(x == x for i, x in enumerate(gs["losses"]) if i != 2)


def test_plan_names_why_a_step_is_not_captured():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    base = _cfg(Path("unused"))
    assert capture_blocker(base, cuda) is None
    z2 = _cfg(Path("unused"), "deepspeed.zero_stage=2")
    assert "zero_stage=2" in capture_blocker(z2, cuda)
    assert "grad_clip" in capture_blocker(_cfg(Path("unused"), "optim.grad_clip=1.0"), cuda)
    p = plan_step(z2, cuda)
    assert not p.graph_safe and "running DeepSpeed's step" in p.reason and "\n" not in p.reason
    assert plan_step(base, cuda).capture
    assert not plan_step(base, cpu).graph_safe  # auto on a CPU: DeepSpeed's step, nothing to report
    # true on a CPU: the graph-safe step, uncaptured, and a line saying so
    assert plan_step(_cfg(Path("unused"), "fast.cuda_graph=true"), cpu) == StepPlan(
        graph_safe=True, capture=False,
        reason="fast.cuda_graph=true without CUDA: the graph-safe step runs uncaptured")
    assert not plan_step(_cfg(Path("unused"), "fast.cuda_graph=false"), cuda).graph_safe


# ------------------------------------------------------------------------------ GPU only

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")


def _gpu_run(run_dir: Path, *overrides: str) -> dict:
    # Deterministic kernels, so that two runs of the same arithmetic agree bit for bit.
    torch.backends.cudnn.deterministic = True
    train(_cfg(run_dir, "run.device=cuda", "run.max_images=80", "run.precision=fp32", "fast.attention=math",
               *overrides))
    return _final_state(run_dir)


@cuda_only
def test_a_captured_step_equals_the_uncaptured_step_over_20_steps(tmp_path, capsys):
    eager = _gpu_run(tmp_path / "eager", "fast.cuda_graph=false")
    graph = _gpu_run(tmp_path / "graph", "fast.cuda_graph=true")
    assert " cuda-graph" in capsys.readouterr().out  # it really was captured
    assert len(graph["losses"]) == 20
    _assert_equal(graph, eager)


@cuda_only
def test_a_nan_step_is_skipped_inside_the_graph(tmp_path, capsys):
    eager = _gpu_run(tmp_path / "eager", "fast.cuda_graph=false", "debug.nan_at_steps=[7]")
    graph = _gpu_run(tmp_path / "graph", "fast.cuda_graph=true", "debug.nan_at_steps=[7]")
    assert " cuda-graph" in capsys.readouterr().out
    # step 7 comes after the capture (3 warm-up steps, captured at step 4)
    assert {int(v["step"]) for v in graph["opt"]["state"].values()} == {19}
    assert graph["losses"][6] != graph["losses"][6]
    _assert_equal(graph, eager)


@cuda_only
def test_capturable_fused_adam_equals_the_plain_fused_adam():
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.randn(64, 32, device="cuda", generator=g) for _ in range(3)]
    runs = []
    for capturable in (False, True):
        params = [p.clone().requires_grad_() for p in ps]
        opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=capturable)
        for i in range(5):
            for p in params:
                p.grad = torch.sin(p.detach() * (i + 1))
            opt.found_inf = torch.tensor(float(i == 2), device="cuda")
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ a failed capture

class _FailingCapture:
    """Stands in for ``torch.cuda.graph``: records how it was called, and fails as a capture does
    when, e.g., another thread's CUDA call invalidates it."""

    calls: list[dict] = []

    def __init__(self, graph, **kwargs):
        _FailingCapture.calls.append(kwargs)

    def __enter__(self):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    def __exit__(self, *exc):
        return False


def test_a_failed_capture_falls_back_to_the_eager_step_with_one_line_and_the_same_weights(tmp_path, capsys,
                                                                                         monkeypatch):
    # 6 steps: 3 warm-up steps, the capture attempt at step 4 (which fails), a NaN at step 5 after it.
    common = ["run.device=cpu", "run.max_images=24", "debug.nan_at_steps=[5]", "deepspeed.grad_accum=2",
              "ema.every=2", "fast.cuda_graph=true"]
    train(_cfg(tmp_path / "plain", *common))  # the graph-safe step, never captured
    plain = _final_state(tmp_path / "plain")
    capsys.readouterr()

    # The same run planned for capture (as on CUDA), with a capture that fails.
    monkeypatch.setattr(loop, "plan_step", lambda cfg, device: StepPlan(graph_safe=True, capture=True, reason=None))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", _FailingCapture)
    _FailingCapture.calls = []
    captures = []
    real_capture = graph_step.GraphStep._capture
    monkeypatch.setattr(graph_step.GraphStep, "_capture",
                        lambda self: (captures.append(self.calls), real_capture(self))[1])
    result = train(_cfg(tmp_path / "failed", *common))
    out = capsys.readouterr().out
    assert result.status == "done" and result.step == 6
    assert " cuda-graph" in out  # planned for capture
    assert captures == [3]  # one attempt, after the warm-up steps
    assert _FailingCapture.calls == [{"capture_error_mode": "thread_local"}]
    line = ("[diti-fast] CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
            "capturing); running the step eagerly from now on")
    assert [ln for ln in out.splitlines() if "capture failed" in ln] == [line]
    failed = _final_state(tmp_path / "failed")
    # The optimiser was made capturable for the planned capture: the one setting that differs.
    assert [g.pop("capturable") for g in failed["opt"]["param_groups"]] == [True]
    assert [g.pop("capturable") for g in plain["opt"]["param_groups"]] == [False]
    _assert_equal(failed, plain)
    assert {int(v["step"]) for v in failed["opt"]["state"].values()} == {5}  # the NaN step was still skipped
