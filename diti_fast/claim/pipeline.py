"""The claim run's phases, each skipped when its outputs exist (so an interrupted run resumes).

    shards -> ddpm (+ recognisability checks) -> diti, pdae (same frozen DDPM, same images)
           -> attribution (probes x seeds, bootstrap) -> grids (counterfactuals) -> report

Work directory (``--work``, default runs/claim or runs/claim-smoke): data/, judge/, ddpm/, diti/, pdae/
(run directories: the engine resumes them from their checkpoints), attribution/, grids/. The committed
results (``--results``) are written by the report phase from what those hold.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import write_text_atomic
from .plan import Plan

ENCODERS = ("diti", "pdae")


def log(msg: str) -> None:
    print(f"[claim] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    from ..eval.report import jsonable
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a phase's marker file exists only when the phase finished
    write_text_atomic(path, json.dumps(jsonable(obj), indent=1))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Context:
    plan: Plan
    work: Path
    threads: int = 0
    device: str = "cpu"
    timings: dict = field(default_factory=dict)

    @property
    def train_shards(self) -> Path:
        return self.work / "data" / "train"

    @property
    def eval_shards(self) -> Path:
        return self.work / "data" / "eval"

    def run_dir(self, name: str) -> Path:
        return self.work / name


# ----------------------------------------------------------------------------------------- shards

def phase_shards(ctx: Context) -> dict:
    from data_shards.synthetic import make_synthetic_shards
    from data_shards.synthetic_clear import factor_deltas
    from ..diffusion import make_schedule
    from ..config import DiffusionConfig
    from .attribution import survival_t
    p = ctx.plan
    for out, num, seed in ((ctx.train_shards, p.train_samples, 0), (ctx.eval_shards, p.eval_samples, 1)):
        if not (out / "manifest.json").is_file():
            log(f"making {num} synthetic 32x32 samples (clear variant, seed {seed}) in {out}")
            make_synthetic_shards(out, num, image_size=32, seed=seed, maxcount=2000, workers=1, variant="clear")
    path = ctx.work / "data" / "factors.json"
    if not path.is_file():
        deltas = factor_deltas(256, 32)
        ac = make_schedule(DiffusionConfig()).alphas_cumprod.double().numpy()
        write_json(path, {name: {"delta_l2_median": float(np.median(d)), "delta_l2_p10": float(np.percentile(d, 10)),
                                 "delta_l2_p90": float(np.percentile(d, 90)),
                                 "bayes_survival_t_median": survival_t(float(np.median(d)), ac)}
                          for name, d in deltas.items()})
    return read_json(path)


# ----------------------------------------------------------------------------------------- training

def _train(ctx: Context, name: str, overrides: list[str]):
    from ..engine.loop import train
    from ..engine.run_config import load_config
    p = ctx.plan
    cfg = load_config("shapes32", [f"data.shards={ctx.train_shards}", f"run.dir={ctx.run_dir(name)}",
                                   f"run.device={ctx.device}", f"run.threads={ctx.threads}",
                                   f"data.batch_size={p.batch_size}", "data.num_workers=1",
                                   f"checkpoint.every={p.checkpoint_every}", "log.progress=false",
                                   "log.every=10", "log.tensorboard=false"] + overrides)
    res = train(cfg)
    if res.status != "done":
        raise RuntimeError(f"{name}: training stopped early ({res.status}) at step {res.step}; rerun to resume")
    return res


def _judge(ctx: Context):
    """The recognisability judge, trained once on real held-out images (cached weights)."""
    from ..eval.features import iter_batches
    from ..data import to_model_input
    from . import judge as J
    from data_shards.synthetic_clear import COLOURS, SHAPES
    classes = {"colour": len(COLOURS), "shape": len(SHAPES)}
    path = ctx.work / "judge" / "judge.pt"
    xs, ys = [], []
    for _, imgs, attrs in iter_batches(ctx.eval_shards, 256):
        xs.append(to_model_input(imgs, "cpu"))
        ys.append(attrs)
    x, y = torch.cat(xs), np.concatenate(ys)
    names = [a["name"] for a in json.loads((ctx.eval_shards / "manifest.json").read_text())["attributes"]]
    labels = {k: np.rint(y[:, names.index(k)]).astype(np.int64) for k in classes}
    n = min(ctx.plan.judge_train, len(x) * 4 // 5)
    held = slice(n, None)  # judged as "real" images: never seen by the judge
    if path.is_file():
        judge = J.Judge(classes)
        judge.load_state_dict(torch.load(path, weights_only=True))
        judge.eval()
    else:
        judge = J.train_judge(x[:n], {k: v[:n] for k, v in labels.items()}, classes, ctx.plan.judge_epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), path)
    real = J.judge_images(judge, x[held])
    real["accuracy"] = J.accuracy(real, {k: v[held] for k, v in labels.items()})
    # The floor: what the judge says of junk it must not accept (Gaussian noise, the size of the samples).
    g = torch.Generator().manual_seed(1)
    real["noise_confident_fraction"] = J.judge_images(
        judge, torch.randn((ctx.plan.judge_samples, 3, 32, 32), generator=g).clamp(-1, 1))["confident_fraction"]
    return judge, real


def _recognisability(ctx: Context, judge, real: dict, images: int) -> dict:
    from ..eval.features import load_run
    from ..eval.grids import save_grid
    from ..eval.sample import ddpm_samples
    from . import judge as J
    ex = load_run(ctx.run_dir("ddpm"), "cpu", stage="ddpm")
    p = ctx.plan
    x = ddpm_samples(ex, p.judge_samples, p.sample_steps, seed=0, image_size=32)
    res = J.judge_images(judge, x)
    ratio = res["confident_fraction"] / max(real["confident_fraction"], 1e-9)
    ncol = 8
    rows = max(1, min(4, len(x) // ncol))
    save_grid(ctx.run_dir("ddpm") / f"samples-{images:08d}.png", x[:rows * ncol].reshape(rows, ncol, *x.shape[1:]),
              title=f"DDPM after {images} images, {p.sample_steps} DDIM steps")
    return {"images": images, "sample_steps": p.sample_steps, "samples": res, "real": real,
            "ratio_to_real": ratio, "recognisable": ratio >= p.recognisable}


def phase_ddpm(ctx: Context) -> dict:
    """Train in ``ddpm_checks`` segments; after each, judge the samples; stop once they are recognisable."""
    p = ctx.plan
    done = ctx.run_dir("ddpm") / "ddpm_phase.json"
    if done.is_file():
        return read_json(done)
    judge, real = _judge(ctx)
    log(f"judge on real held-out images: accuracy {real['accuracy']}, confident fraction "
        f"{real['confident_fraction']:.3f}")
    checks = []
    for k in range(1, p.ddpm_checks + 1):
        target = max(p.batch_size, (p.ddpm_images * k // p.ddpm_checks) // p.batch_size * p.batch_size)
        marker = ctx.run_dir("ddpm") / f"check-{target:08d}.json"
        if marker.is_file():
            check = read_json(marker)
        else:
            log(f"ddpm: training to {target} images (check {k}/{p.ddpm_checks})")
            _train(ctx, "ddpm", ["stage=ddpm", f"run.max_images={target}", f"optim.lr={p.ddpm_lr}"])
            check = _recognisability(ctx, judge, real, target)
            write_json(marker, check)
        log(f"ddpm at {target} images: confident fraction of samples {check['samples']['confident_fraction']:.3f} "
            f"({check['ratio_to_real']:.2f} of real images' {real['confident_fraction']:.3f})")
        checks.append(check)
        if check["recognisable"]:
            break
    out = {"checks": checks, "images": checks[-1]["images"], "recognisable": checks[-1]["recognisable"],
           "criterion": f"confident fraction (colour and shape both >= {checks[-1]['samples']['threshold']}) of "
                        f"{p.judge_samples} samples >= {p.recognisable} x that of real held-out images"}
    write_json(done, out)
    return out


def phase_encoder(ctx: Context, name: str) -> dict:
    from ..weights import export_path
    p = ctx.plan
    mode = {"diti": "base", "pdae": "pdae"}[name]
    if not export_path(ctx.run_dir(name)).is_file():
        log(f"{name}: diti.mode={mode}, {p.diti_images} images on the frozen DDPM")
        _train(ctx, name, [f"init.ddpm={ctx.run_dir('ddpm')}", f"diti.mode={mode}",
                           f"run.max_images={p.diti_images}", f"optim.lr={p.diti_lr}"])
    recs = [json.loads(line) for line in (ctx.run_dir(name) / "metrics.jsonl").read_text().splitlines() if line]
    last = recs[-1]
    # How much the shift decoder has learnt: its output conv starts at zero, so the first records'
    # loss is the frozen DDPM's own (weighted) error; a small drop means z is still barely used.
    k = max(1, len(recs) // 10)
    first_tenth = float(np.mean([r["loss"] for r in recs[:k]]))
    last_tenth = float(np.mean([r["loss"] for r in recs[-k:]]))
    return {"mode": mode, "images": p.diti_images, "last_loss": last["loss"], "last_loss_t": last["loss_t"],
            "loss_first_tenth": first_tenth, "loss_last_tenth": last_tenth,
            "loss_drop_fraction": 1.0 - last_tenth / first_tenth}


# ----------------------------------------------------------------------------------------- attribution

def phase_attribution(ctx: Context, name: str) -> dict:
    from ..eval.chunks import chunk_groups
    from ..eval.features import cached_features, load_run, make_splits
    from ..eval.probe import ProbeConfig, specs_from_manifest
    from . import attribution as A
    out = ctx.work / "attribution" / f"{name}.json"
    if out.is_file():
        return read_json(out)
    p = ctx.plan
    ex = load_run(ctx.run_dir(name), "cpu")
    fs = cached_features(ctx.run_dir(name), ctx.eval_shards, ex.encoder, "cpu", max_samples=p.probe_samples, log=log)
    sp = make_splits(fs)
    specs = specs_from_manifest(fs.attributes)
    groups = chunk_groups(ex.model_cfg)
    cfg = ProbeConfig(epochs=p.probe_epochs, lr=1e-2, standardize=True)
    log(f"{name}: probes over {len(groups)} groups x 3 (alone, prefix, random) x seeds {list(p.probe_seeds)}")
    runs = A.run_probes(*[(s.z, s.attrs) for s in (sp.train, sp.val, sp.test)], specs, groups, p.probe_seeds, cfg,
                        log=log)
    boot = A.bootstrap_skills(runs, p.bootstrap)
    summary = A.summarise(runs, boot)
    summary.update(split=sp.description, sizes={"train": len(sp.train), "val": len(sp.val), "test": len(sp.test)},
                   probe=cfg.__dict__, point=runs.point)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".skills.npy"), boot)  # [seed, resample, mode, attribute, group]
    write_json(out, summary)
    return summary


# ----------------------------------------------------------------------------------------- grids

def _pairs(attrs: np.ndarray, positions: np.ndarray, cols: list[int], n: int) -> list[tuple[int, int]]:
    """``n`` disjoint test pairs, each differing in every judged attribute where possible (greedy)."""
    free = list(range(len(positions)))
    pairs = []
    while len(pairs) < n and len(free) >= 2:
        a = free.pop(0)
        diff = [(int((attrs[a, cols] != attrs[b, cols]).sum()), -j) for j, b in enumerate(free)]
        j = -max(diff)[1]
        pairs.append((int(positions[a]), int(positions[free.pop(j)])))
    return pairs


def phase_grids(ctx: Context, name: str, judge=None) -> dict:
    """Counterfactuals with A's own inverted x_T: one row per stage, A's z with that stage's dims taken
    from B. Numbers over several pairs: how often the judged colour / shape of the decode becomes B's."""
    from ..eval.chunks import chunk_groups
    from ..eval.counterfactual import Sampler, swap_chunks
    from ..eval.features import load_images, load_run, cached_features, make_splits
    from ..eval.grids import save_grid
    from ..sampling import masked_ddim
    from . import judge as J
    out = ctx.work / "grids" / f"{name}.json"
    if out.is_file():
        return read_json(out)
    p = ctx.plan
    ex = load_run(ctx.run_dir(name), "cpu")
    sampler = Sampler(ex, "cpu")
    # PDAE was trained on the whole z: decode it unmasked, as it was trained.
    masks = None if name == "pdae" else sampler.masks
    groups = chunk_groups(ex.model_cfg)
    sp = make_splits(cached_features(ctx.run_dir(name), ctx.eval_shards, ex.encoder, "cpu",
                                     max_samples=p.probe_samples, log=log))
    names = [a["name"] for a in sp.test.attributes]
    cols = [names.index("colour"), names.index("shape")]
    pairs = _pairs(sp.test.attrs[:64], sp.test.position[:64], cols, p.grid_pairs)
    if judge is None:
        judge, _ = _judge(ctx)
    rows_all, stats = [], {g.name: {"colour_became_B": [], "shape_became_B": [], "pixel_change": []} for g in groups}
    for pi, (pa, pb) in enumerate(pairs):
        x = load_images(ctx.eval_shards, [pa, pb], "cpu")
        z = sampler.encode(x)
        xT = masked_ddim(ex.decoder, x, z, sampler.sched, masks, steps=p.invert_steps, inverse=True)
        alphas = p.alphas if pi == 0 else (0.0, 1.0)
        # α = 0 is A's own reconstruction in every row: decoded once.
        zs = [z[:1]] + [swap_chunks(z[:1], z[1:], g.dim_lo, g.dim_hi, al) for g in groups for al in alphas if al]
        zc = torch.cat(zs)
        flat = torch.cat([masked_ddim(ex.decoder, xT[:1].expand(len(zc[i:i + 32]), -1, -1, -1), zc[i:i + 32],
                                      sampler.sched, masks, steps=p.decode_steps) for i in range(0, len(zc), 32)])
        cell = iter(range(1, len(flat)))
        dec = torch.stack([torch.stack([flat[0] if al == 0 else flat[next(cell)] for al in alphas]) for _ in groups])
        jr = J.judge_images(judge, torch.cat([x, dec[:, -1]]))
        for gi, g in enumerate(groups):
            for head, key in (("colour", "colour_became_B"), ("shape", "shape_became_B")):
                pa_, pb_, pd = jr[head]["pred"][0], jr[head]["pred"][1], jr[head]["pred"][2 + gi]
                if pa_ != pb_:
                    stats[g.name][key].append(float(pd == pb_))
            stats[g.name]["pixel_change"].append(float((dec[gi, -1] - dec[gi, 0]).abs().mean()))
        if pi == 0:
            rows_all = (torch.cat([x[:1].expand(len(groups), -1, -1, -1)[:, None], dec,
                                   x[1:].expand(len(groups), -1, -1, -1)[:, None]], 1), alphas, pa, pb)
    imgs, alphas, pa, pb = rows_all
    ctx_dir = ctx.work / "grids"
    ctx_dir.mkdir(parents=True, exist_ok=True)
    save_grid(ctx_dir / f"counterfactuals_{name}.png", imgs,
              [f"{g.name} z[{g.dim_lo}:{g.dim_hi}]" for g in groups],
              ["A"] + [f"α={a:g}" for a in alphas] + ["B"],
              title=f"{name}: A=#{pa} takes stage dims from B=#{pb}; A's x_T; {p.invert_steps}/{p.decode_steps} DDIM")
    res = {"pairs": pairs, "invert_steps": p.invert_steps, "decode_steps": p.decode_steps,
           "decoded_with_masks": masks is not None,
           "per_group": {g: {k: {"mean": float(np.mean(v)) if v else None, "n": len(v)} for k, v in s.items()}
                         for g, s in stats.items()}}
    write_json(out, res)
    return res


def timed(ctx: Context, key: str, fn, *args, **kw):
    t = time.perf_counter()
    r = fn(*args, **kw)
    ctx.timings[key] = round(time.perf_counter() - t, 2)
    return r
