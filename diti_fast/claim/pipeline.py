"""The claim run's phases, each skipped when its output exists (so an interrupted run resumes).

    data -> design (exact Bayes lost-t table) -> probe (fastest CPU path) -> ddpm -> gate 1 (DDPM)
         -> arms x seeds (DiTi base, DiTi stop_grad, PDAE; one frozen DDPM) -> measure (gate 2, stage
         distances, held-out losses, probes) -> analysis (stage share, intervals, verdict)

Work directory (``--work``, default runs/claim or runs/claim-smoke): data/, design.json, probe.json,
ddpm/ (a run directory: the engine resumes it from its checkpoints), ddpm_gate.json, one run
directory per arm and seed (``diti-s0``, ...), measure/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_shards import synthetic_staged as S
from data_shards.synthetic_staged import make_staged_shards

from ..engine.config_files import load_config
from ..engine.loop import train
from ..eval.features import load_run
from ..eval.jsonable import jsonable
from ..files import write_text_atomic
from ..grids import save_grid
from . import bayes, measure, speed
from . import stage_share as SS
from .plan import Plan

PRESET = "claim16"
ARM_MODES = {"diti": "base", "diti_stopgrad": "stop_grad", "pdae": "pdae"}
PRIMARY, BASELINE = "diti", "pdae"
TEST_SEED, HELDOUT_SEED = 101, 102


def log(msg: str) -> None:
    print(f"[claim] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a phase's output exists only when the phase finished
    write_text_atomic(path, json.dumps(jsonable(obj), indent=1))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Context:
    plan: Plan
    work: Path
    threads: int = 0
    timings: dict = field(default_factory=dict)
    _design: bayes.Design | None = None

    @property
    def shards(self) -> Path:
        return self.work / "data" / "train"

    def run_dir(self, name: str) -> Path:
        return self.work / name

    @property
    def design(self) -> bayes.Design:
        if self._design is None:
            self._design = bayes.Design()
        return self._design

    @property
    def dims_per_stage(self) -> tuple[int, ...]:
        return tuple(load_config(PRESET, []).model.masks.dims_per_stage)

    def values(self, seed: int, n: int) -> np.ndarray:
        return S.draw_values(seed, np.arange(n))


def timed(ctx: Context, key: str, fn, *args, **kw):
    t = time.perf_counter()
    r = fn(*args, **kw)
    ctx.timings[key] = round(time.perf_counter() - t, 2)
    return r


# ----------------------------------------------------------------------------------------- data

def phase_data(ctx: Context) -> dict:
    if not (ctx.shards / "manifest.json").is_file():
        log(f"making {ctx.plan.train_samples} staged 16x16 samples (seed 0) in {ctx.shards}")
        make_staged_shards(ctx.shards, ctx.plan.train_samples, seed=0)
    m = read_json(ctx.shards / "manifest.json")
    return {"train_samples": m["num_samples"], "combinations": S.NUM_COMBINATIONS,
            "factors": [a["name"] for a in S.ATTRIBUTES]}


def phase_design(ctx: Context) -> dict:
    path = ctx.work / "design.json"
    if not path.is_file():
        log(f"exact Bayes: where each factor is lost ({ctx.plan.design_images} images, t every 10 steps)")
        write_json(path, bayes.design_table(ctx.design, n_images=ctx.plan.design_images))
    return read_json(path)


def phase_probe(ctx: Context) -> dict:
    path = ctx.work / "probe.json"
    if not path.is_file():
        if ctx.plan.probe:
            cfg = load_config(PRESET, [])
            res = speed.choose(cfg.model, ctx.plan.batch_size, ctx.plan.arm_minutes * 60, log=log)
        else:
            row = {"precision": "fp32", "channels_last": False, "compile": False}
            res = {"candidates": [], "chosen": row, "note": "not probed (smoke plan)"}
        write_json(path, res)
    res = read_json(path)
    c = res["chosen"]
    log(f"training path: {c['precision']}, channels_last={c['channels_last']}, compile={c['compile']}")
    return res


# ----------------------------------------------------------------------------------------- training

def _train(ctx: Context, name: str, choice: dict, images: int, minutes: float, overrides: list[str]) -> dict:
    """One engine run, by images (``images`` > 0) or by wall clock (``minutes``)."""
    p = ctx.plan
    length = ([f"run.max_images={images}"] if images else
              [f"run.max_images={10 ** 9}", f"run.time_limit_minutes={minutes}"])
    cfg = load_config(PRESET, [f"data.shards={ctx.shards}", f"run.dir={ctx.run_dir(name)}", "run.device=cpu",
                               f"run.threads={ctx.threads}", f"data.batch_size={p.batch_size}",
                               "data.num_workers=1", f"checkpoint.every={p.checkpoint_every}",
                               "log.progress=false", "log.tensorboard=false"]
                      + speed.overrides(choice) + length + overrides)
    t0 = time.perf_counter()
    res = train(cfg)
    if res.status not in ("done", "time_limit"):
        raise RuntimeError(f"{name}: training stopped early ({res.status}) at step {res.step}; rerun to resume")
    recs = [json.loads(x) for x in (ctx.run_dir(name) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    k = max(1, len(recs) // 10)
    return {"images": res.step * p.batch_size, "steps": res.step, "status": res.status,
            "seconds_this_launch": round(time.perf_counter() - t0, 1),
            "images_per_s_last": recs[-1].get("images_per_s") if recs else None,
            "loss_first_tenth": float(np.mean([r["loss"] for r in recs[:k]])) if recs else None,
            "loss_last_tenth": float(np.mean([r["loss"] for r in recs[-k:]])) if recs else None,
            "loss_t_last": recs[-1].get("loss_t") if recs else None}


def phase_ddpm(ctx: Context, choice: dict) -> dict:
    path = ctx.run_dir("ddpm") / "ddpm_phase.json"
    if not path.is_file():
        p = ctx.plan
        log(f"ddpm: {'%d images' % p.ddpm_images if p.ddpm_images else '%g min' % p.ddpm_minutes}")
        write_json(path, _train(ctx, "ddpm", choice, p.ddpm_images, p.ddpm_minutes,
                                ["stage=ddpm", f"optim.lr={p.ddpm_lr}"]))
    return read_json(path)


def arm_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def phase_arm(ctx: Context, arm: str, seed: int, choice: dict, images: int) -> dict:
    path = ctx.run_dir(arm_name(arm, seed)) / "arm_phase.json"
    if not path.is_file():
        p = ctx.plan
        log(f"{arm_name(arm, seed)}: diti.mode={ARM_MODES[arm]}, "
            f"{'%d images' % images if images else '%g min' % p.arm_minutes}")
        write_json(path, _train(ctx, arm_name(arm, seed), choice, images, p.arm_minutes,
                                [f"init.ddpm={ctx.run_dir('ddpm')}", f"diti.mode={ARM_MODES[arm]}",
                                 f"run.seed={seed}", f"optim.lr={p.diti_lr}"]))
    return read_json(path)


# ----------------------------------------------------------------------------------------- gates

def phase_ddpm_gate(ctx: Context) -> dict:
    path = ctx.work / "ddpm_gate.json"
    if not path.is_file():
        p = ctx.plan
        ex = load_run(ctx.run_dir("ddpm"), "cpu", stage="ddpm")
        cmp = measure.ddpm_vs_bayes(ex.unet, ctx.design, ctx.values(HELDOUT_SEED, p.heldout_images), seed=HELDOUT_SEED)
        below = [i for i, lo in enumerate(cmp["bucket_edges"][:-1]) if lo < 500]
        excess = [cmp["ddpm"][i] - cmp["bayes"][i] for i in below]
        samples = measure.sample_validity(ex, ctx.design, p.sample_count, p.sample_steps, p.sample_max_rms)
        imgs = samples.pop("images")
        ncol = min(8, len(imgs))
        rows = max(1, min(4, len(imgs) // ncol))
        save_grid(ctx.work / "ddpm_samples.png", imgs[:rows * ncol].reshape(rows, ncol, *imgs.shape[1:]),
                  title=f"DDPM samples, {p.sample_steps} DDIM steps")
        write_json(path, {
            "denoiser": {**cmp, "excess_below_500": excess, "margin": p.ddpm_excess,
                         "pass": all(e <= p.ddpm_excess for e in excess)},
            "samples": {**samples, "min_valid": p.sample_min_valid,
                        "pass": samples["valid_fraction"] >= p.sample_min_valid}})
    return read_json(path)


def phase_measure(ctx: Context, arm: str, seed: int) -> tuple[dict, SS.Distances]:
    name = arm_name(arm, seed)
    out = ctx.work / "measure" / f"{name}.json"
    npz = out.with_suffix(".npz")
    if not out.is_file():
        p = ctx.plan
        ex = load_run(ctx.run_dir(name), "cpu")
        losses = measure.heldout_losses(ex, ctx.values(HELDOUT_SEED, p.heldout_images), ARM_MODES[arm],
                                        ctx.dims_per_stage, seed=HELDOUT_SEED)
        values = ctx.values(TEST_SEED, p.test_images)
        d = measure.stage_distances(lambda x: measure.encode(ex.encoder, x), values, ctx.dims_per_stage,
                                    seed=TEST_SEED)
        probes = measure.probe_skills(measure.encode(ex.encoder, measure.images(values)), values,
                                      ctx.dims_per_stage, seed=TEST_SEED)
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, to_factor=d.to_factor, to_other=d.to_other)
        write_json(out, {"losses": losses, "probes": probes})
    f = np.load(npz)
    return read_json(out), SS.Distances(f["to_factor"], f["to_other"])


# ----------------------------------------------------------------------------------------- analysis

def analysis(ctx: Context, design: dict, ddpm_gate: dict, measured: dict) -> dict:
    names = [a["name"] for a in S.ATTRIBUTES]
    table = design["factors"]
    lost = np.array([table[n]["lost_t_p50"] for n in names])
    fine = [i for i, n in enumerate(names) if table[n]["lost_stage"] == 1]
    coarse = [i for i, n in enumerate(names) if table[n]["lost_stage"] == 3]
    seeds = ctx.plan.seeds
    arms = {a: [measured[(a, s)][1] for s in seeds] for a in ctx.plan.arms}
    res = SS.analyse(arms, lost, fine, coarse, [a for a in ctx.plan.arms if a != BASELINE], BASELINE,
                     resamples=ctx.plan.bootstrap, seed=0,
                     crossover=(names.index("brightness"), names.index("stripes")))
    increases = {arm_name(a, s): measured[(a, s)][0]["losses"]["shuffle_increase"] for a in ctx.plan.arms for s in seeds}
    sens = {arm_name(a, s): dict(zip(names, SS.sensitivity(measured[(a, s)][1]).tolist()))
            for a in ctx.plan.arms for s in seeds}
    in_metric = [names[i] for i in fine + coarse]
    gates = {
        "ddpm_denoiser": {"pass": ddpm_gate["denoiser"]["pass"],
                          "rule": f"per 100-step t-bucket below 500: DDPM ε-MSE − exact posterior-mean ε-MSE "
                                  f"<= {ctx.plan.ddpm_excess}",
                          "excess": ddpm_gate["denoiser"]["excess_below_500"]},
        "ddpm_samples": {"pass": ddpm_gate["samples"]["pass"],
                         "rule": f"valid fraction of {ctx.plan.sample_count} DDIM samples >= {ctx.plan.sample_min_valid} "
                                 f"(nearest design image within RMS {ctx.plan.sample_max_rms})",
                         "valid_fraction": ddpm_gate["samples"]["valid_fraction"]},
        "z_used": {"pass": all(v >= ctx.plan.z_gate for v in increases.values()),
                   "rule": f"shuffling z across held-out images raises every arm run's loss by >= {ctx.plan.z_gate:.0%}",
                   "increase": increases},
        "factors_in_z": {"pass": all(v[n] >= ctx.plan.min_sensitivity for v in sens.values() for n in in_metric),
                         "rule": f"every fine and coarse factor moves z: E‖z(x) − z(x^f)‖² >= "
                                 f"{ctx.plan.min_sensitivity:g} x E‖z(x) − z(y)‖², in every arm run",
                         "sensitivity": sens},
    }
    verdicts = {a: SS.decide(res, a, gates, BASELINE) for a in ctx.plan.arms if a != BASELINE}
    follows = {a: SS.order_follows(res, a) for a in verdicts}
    return {"factor_names": names, "stage_share": res, "gates": gates, "verdicts": verdicts,
            "verdict": verdicts[PRIMARY]["verdict"], "primary_arm": PRIMARY, "order_follows": follows}
