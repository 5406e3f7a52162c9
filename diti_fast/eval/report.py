"""The evaluation report of a DiTi run: ``RUN/report/report.md`` + figures + ``report.json``.

Sections: linear probe on all of z, per-chunk attribution (table, heatmap, onset summary, and for data
whose manifest tags attributes as fine/coarse the comparison DiTi's claim is about), a counterfactual
grid, reconstructions and DDPM samples. Everything the numbers depend on (sample cap, probe settings,
DDIM steps, split) is written into the report itself.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..grids import save_grid
from .chunks import ChunkTable, chunk_attribution, chunk_groups, format_chunk_table, plot_heatmap
from .counterfactual import DEFAULT_ALPHAS, DEFAULT_LOC, DEFAULT_WIDTH, Sampler, counterfactuals, reconstructions
from .features import (cached_features, check_same_attributes, load_images, load_run, make_splits, resolve_export,
                       shard_spec)
from .jsonable import jsonable
from .manipulate import ManipConfig, run_manipulation
from .probe import ProbeConfig, format_probe_table, specs_from_manifest, train_probe
from .sample import ddpm_samples


@dataclass
class ReportSettings:
    """Defaults sized for the CPU demo (32 px, a few thousand samples, ~1-2 min on 2 cores)."""
    max_samples: int | None = 4000
    # The paper's lr 1e-3 and raw features suit 162k CelebA images (~19k Adam steps in 15 epochs); with a
    # few thousand samples there are ~400 steps, too few to get past the probe's random init, so the
    # report standardises features and uses 1e-2 (and says so).
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(lr=1e-2, standardize=True))
    n_groups: int = 8                 # balanced masks only; unequal masks group by stage
    steps: int = 20                   # reverse masked-DDIM steps for every grid
    invert_steps: int = 20            # inversion steps
    loc: tuple[int, ...] = DEFAULT_LOC
    width: tuple[int, ...] = DEFAULT_WIDTH
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    mirror: bool = False              # B←A rows too: doubles the counterfactual decodes
    fixed_alphas: tuple[float, ...] = (0.0, 0.5, 1.0)  # the second grid, with A's own x_T
    n_recon: int = 6
    # Manipulation grid: the first binary attribute (else the first categorical one, its first class),
    # a few test images, these strengths; lr 1e-2 for the small-data classifier (as the probe's).
    manip_attribute: str | None = None
    manip_scales: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    manip_num: int = 4
    manip_lr: float = 1e-2
    n_samples: int = 16
    batch_size: int = 256
    seed: int = 0


def _pick_pair(test_attrs: np.ndarray, specs, positions: np.ndarray, search: int = 64) -> tuple[int, int]:
    """Two test images that differ in as many discrete attributes as possible (a counterfactual between
    near-identical images shows nothing)."""
    disc = [i for i, s in enumerate(specs) if s.kind != "continuous"]
    n = min(search, len(positions))
    if n < 2:
        raise ValueError("need at least two test samples for a counterfactual pair")
    if not disc:
        return int(positions[0]), int(positions[1])
    a = test_attrs[:n][:, disc]
    diff = (a[:, None, :] != a[None, :, :]).sum(-1)
    i, j = np.unravel_index(np.argmax(diff), diff.shape)
    return int(positions[min(i, j)]), int(positions[max(i, j)])


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _claim_section(table: ChunkTable) -> tuple[list[str], dict]:
    """Fine vs coarse, when the manifest tags attribute groups (the synthetic set does)."""
    on = table.onsets()
    tags = sorted({o["group"] for o in on if o["group"]})
    lines = ["| attribute | tag | best prefix skill | onset group (prefix ≥ 90% of best) | onset z[:E] | "
             "best group alone | skill of first group alone | skill of last group alone |",
             "|---|---|---|---|---|---|---|---|"]
    for o in on:
        g = table.groups[o["onset_group"]].name if o["onset_group"] is not None else "never"
        b = table.groups[o["best_alone_group"]].name if o["best_alone_group"] is not None else "–"
        lines.append(f"| {o['name']} | {o['group'] or ''} | {_fmt(o['best_prefix_skill'])} | {g} | "
                     f"{o['onset_dim'] if o['onset_dim'] is not None else '–'} | {b} | "
                     f"{_fmt(o['first_group_alone_skill'])} | {_fmt(o['last_group_alone_skill'])} |")
    summary = {}
    if {"fine", "coarse"} <= set(tags):
        for tag in ("fine", "coarse"):
            sel = [o for o in on if o["group"] == tag]
            onsets = [o["onset_group"] for o in sel if o["onset_group"] is not None]
            summary[tag] = {
                "attributes": [o["name"] for o in sel],
                "mean_onset_group": float(np.mean(onsets)) + 1 if onsets else None,  # 1-based like the names
                "never_decodable": [o["name"] for o in sel if o["onset_group"] is None],
                "mean_first_group_alone_skill": float(np.nanmean([o["first_group_alone_skill"] for o in sel])),
                "mean_last_group_alone_skill": float(np.nanmean([o["last_group_alone_skill"] for o in sel])),
                "mean_first_group_random_skill": (float(np.nanmean([o["first_group_random_skill"] for o in sel]))
                                                  if table.random is not None else None),
            }
        f, c = summary["fine"], summary["coarse"]
        lines += ["", "Fine vs coarse (DiTi's claim: fine attributes are decodable from early chunks, coarse ones "
                  "need later chunks):", "",
                  "| tag | mean onset group | never decodable | mean skill, first group alone | "
                  "same width, random dims | mean skill, last group alone |", "|---|---|---|---|---|---|"]
        for tag, s in (("fine", f), ("coarse", c)):
            lines.append(f"| {tag} | {_fmt(s['mean_onset_group'])} | {', '.join(s['never_decodable']) or '–'} | "
                         f"{_fmt(s['mean_first_group_alone_skill'])} | {_fmt(s['mean_first_group_random_skill'])} | "
                         f"{_fmt(s['mean_last_group_alone_skill'])} |")
        if f["mean_onset_group"] is not None and c["mean_onset_group"] is not None:
            verdict = ("consistent with the claim" if f["mean_onset_group"] < c["mean_onset_group"] else
                       "not consistent with the claim" if f["mean_onset_group"] > c["mean_onset_group"] else
                       "inconclusive (same mean onset)")
            lines += ["", f"Observed: fine attributes reach 90% of their best prefix decodability at group "
                      f"{f['mean_onset_group']:.2f} on average, coarse ones at group {c['mean_onset_group']:.2f}: "
                      f"{verdict}. (Computed from the table above. Onsets are prefix-based, and a wider prefix "
                      "decodes more by width alone: read them with the first-group cells against the random-dims "
                      "control.)"]
            summary["verdict"] = verdict
    return lines, summary


def write_report(run_dir: str | Path, shards: str | Path, device="cpu", settings: ReportSettings | None = None,
                 val_shards: str | Path | None = None, test_shards: str | Path | None = None, log=print) -> Path:
    """Evaluate a DiTi run on ``shards`` and write RUN/report/report.md (+ PNGs, report.json)."""
    s = settings or ReportSettings()
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    export_file = resolve_export(run_dir)
    ex = load_run(export_file, device)
    out = (run_dir if run_dir.is_dir() else export_file.parent.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = ex.model_cfg
    torch.manual_seed(s.seed)

    def feats(path):
        return cached_features(export_file, path, ex.encoder, device, s.batch_size, s.max_samples, log=log)

    train_fs = feats(shards)
    val_fs = feats(val_shards) if val_shards is not None else None
    test_fs = feats(test_shards) if test_shards is not None else None
    check_same_attributes(*[f for f in (train_fs, val_fs, test_fs) if f is not None])
    splits = make_splits(train_fs, val_fs, test_fs)
    specs = specs_from_manifest(train_fs.attributes)
    timings = {"features_s": time.perf_counter() - t0}

    log("probe on all of z")
    t = time.perf_counter()
    data = [(x.z, x.attrs) for x in (splits.train, splits.val, splits.test)]
    full = train_probe(*data, specs, s.probe)
    groups = chunk_groups(cfg, s.n_groups)
    log(f"per-chunk attribution over {len(groups)} groups")
    table = chunk_attribution(splits, specs, groups, s.probe, log=log)
    plot_heatmap(table, out / "chunks_heatmap.png")
    timings["probes_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sampler = Sampler(ex, device)
    pa, pb = _pick_pair(splits.test.attrs, specs, splits.test.position)
    x = load_images(splits.test.source, [pa, pb], device)
    ranges = [(lo, lo + w) for lo, w in zip(s.loc, s.width) if lo < cfg.masks.k]
    log(f"counterfactuals for test images {pa} (A) and {pb} (B)")
    imgs, labels = counterfactuals(sampler, x[:1], x[1:], ranges, s.alphas, s.steps, s.invert_steps, s.mirror)
    save_grid(out / "counterfactuals.png", imgs, labels, [f"α={a:g}" for a in s.alphas],
              title=f"A = #{pa}, B = #{pb}; x_T slerped; {s.invert_steps} inversion / {s.steps} DDIM steps")
    imgs, labels = counterfactuals(sampler, x[:1], x[1:], ranges, s.fixed_alphas, s.steps, s.invert_steps, s.mirror,
                                   slerp_noise=False)
    save_grid(out / "counterfactuals_fixed_noise.png", imgs, labels, [f"α={a:g}" for a in s.fixed_alphas],
              title=f"A = #{pa}, B = #{pb}; x_T of A kept")
    rec_pos = [int(p) for p in splits.test.position[: s.n_recon]]
    xr = load_images(splits.test.source, rec_pos, device)
    rows, rlabels, mse = reconstructions(sampler, xr, s.steps, s.invert_steps, s.seed)
    save_grid(out / "reconstructions.png", rows, rlabels, [f"#{p}" for p in rec_pos])
    manip = _manipulation_grid(export_file, splits.test.source, specs, s, device, out, log)
    samples = ddpm_samples(ex, s.n_samples, s.steps, s.seed, device, image_size=x.shape[-1])
    ncol = int(math.ceil(math.sqrt(s.n_samples)))
    pad = ncol * ncol - s.n_samples
    grid = torch.cat([samples, torch.ones(pad, *samples.shape[1:], device=samples.device)]) if pad else samples
    save_grid(out / "ddpm_samples.png", grid.reshape(ncol, ncol, *samples.shape[1:]),
              title=f"frozen DDPM, {s.steps} DDIM steps")
    timings["grids_s"] = time.perf_counter() - t

    claim_lines, claim = _claim_section(table)
    m = cfg.masks
    masks_desc = (f"k={m.k}, stages {list(m.stages)}, dims_per_stage {list(m.dims_per_stage)}"
                  if m.dims_per_stage is not None else f"k={m.k}, balanced ({cfg.unet.latent_dim // m.k} dims/chunk)")
    pc = s.probe
    md = [f"# DiTi evaluation report: {run_dir.name}", "",
          f"- export: `{export_file}` (stage {ex.stage}, encoder {cfg.encoder.name}, z ∈ R^{cfg.unet.latent_dim}; "
          f"masks {masks_desc})",
          f"- data: `{splits.train.source}`" + (f", val `{val_shards}`" if val_shards else "")
          + (f", test `{test_shards}`" if test_shards else ""),
          f"- split: {splits.description}; train/val/test = {len(splits.train)}/{len(splits.val)}/{len(splits.test)}"
          + (f" (first {s.max_samples} samples of each set)" if s.max_samples else ""),
          f"- probe settings: Linear on frozen EMA features, Adam lr {pc.lr:g}, batch {pc.batch_size}, {pc.epochs} "
          f"epochs, best epoch by mean validation score, seed {pc.seed}, features "
          f"{'standardised with train mean/std' if pc.standardize else 'raw'}"
          + ("" if (pc.lr, pc.epochs, pc.batch_size, pc.standardize) == (1e-3, 15, 128, False) else
             " (the paper: raw features, lr 1e-3, batch 128, 15 epochs, sized for 162k training images)"),
          f"- grids: masked DDIM with {s.invert_steps} inversion and {s.steps} reverse steps "
          "(the original uses 1000 / 100)",
          f"- time: {time.perf_counter() - t0:.0f} s on {device}", "",
          "## Linear probe on all of z", "", format_probe_table(full), "",
          "## Per-chunk attribution", "",
          "Each attribute is probed from each group's dims alone and from the cumulative prefix z[:hi] (what a "
          "time-step in that group conditions on). Cells: AP (binary) / accuracy (categorical) / Pearson r "
          "(continuous) on the test split, with skill in parentheses (0 = chance: base rate, majority class, "
          "r ≤ 0; 1 = perfect).", "",
          "| group | chunks | dims | time-steps |", "|---|---|---|---|"]
    md += [f"| {g.name} | {g.chunk_lo}–{g.chunk_hi - 1} | [{g.dim_lo}, {g.dim_hi}) | [{g.t_lo}, {g.t_hi}) |"
           for g in groups]
    md += ["", "### Group alone", "", format_chunk_table(table, "alone"), "",
           "### Cumulative prefix", "", format_chunk_table(table, "prefix"), "",
           "### Control: as many dims as the group, drawn at random from all of z", "",
           "Groups differ in width, and a wider group decodes more by width alone: a group's 'alone' cell "
           "means something about *where* an attribute lives only where it beats this control.", "",
           format_chunk_table(table, "random"), "",
           "![per-chunk heatmap](chunks_heatmap.png)", "", "### Onsets", ""] + claim_lines
    md += ["", "## Counterfactuals", "",
           f"Images A (#{pa}) and B (#{pb}) from the test split. Row 'A←B chunks i-j' keeps A's z outside the "
           "chunk range and moves the range towards B's by α, with x_T = slerp(x_T(A), x_T(B), α)"
           + ("; 'B←A' is the mirror" if s.mirror else "")
           + ". Column α=0 is the reconstruction of the row's own image.", "",
           "![counterfactuals](counterfactuals.png)", "",
           "The same ranges with A's own inverted x_T kept (the original's lerpT=False): only the chunk range "
           "changes, so this grid shows what the range encodes; in the one above, α = 1 is largely B whatever "
           "the range, because the inverted x_T alone nearly determines a DDIM decode.", "",
           "![counterfactuals, fixed noise](counterfactuals_fixed_noise.png)", "",
           "## Reconstruction", "", f"Mean squared error of the reconstruction in [-1, 1] units: {mse:.4f}.", "",
           "![reconstructions](reconstructions.png)", ""] + _manipulation_md(manip, s) + [
           "## DDPM samples", "", "![samples](ddpm_samples.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    numbers = {"run": str(run_dir), "export": str(export_file), "data": str(splits.train.source),
               "settings": asdict(s), "split": splits.description,
               "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
               "probe": full.to_json(), "chunks": table.to_json(), "fine_vs_coarse": claim,
               "counterfactual_pair": [pa, pb], "reconstruction_mse": mse, "manipulation": manip,
               "timings": timings}
    (out / "report.json").write_text(json.dumps(jsonable(numbers), indent=1), encoding="utf-8")
    log(f"report written to {out / 'report.md'} ({time.perf_counter() - t0:.0f} s)")
    return out / "report.md"


def _manipulation_grid(export_file, data, specs, s: ReportSettings, device, out: Path, log) -> dict | None:
    """The report's manipulation grid (eval manipulate with the report's DDIM steps), or None when the data
    has no binary or categorical attribute."""
    pick = ([x for x in specs if x.name == s.manip_attribute] if s.manip_attribute else
            [x for x in specs if x.kind == "binary"] or [x for x in specs if x.kind == "categorical"])
    if not pick:
        log("no binary or categorical attribute: no manipulation grid")
        return None
    spec = pick[0]
    attrs = shard_spec(data).attributes
    meta = next(a for a in attrs if a["name"] == spec.name)
    classes = None if spec.kind == "binary" else [str((meta.get("classes") or [0])[0])]
    log(f"manipulation of {spec.name}" + (f"={classes[0]}" if classes else ""))
    res = run_manipulation(export_file, data, spec.name, list(s.manip_scales), device,
                           ManipConfig(lr=s.manip_lr, seed=s.seed), num=s.manip_num, classes=classes,
                           steps=s.steps, invert_steps=s.invert_steps, max_samples=s.max_samples,
                           feature_batch=s.batch_size, out_dir=out, log=log)
    return res


def _manipulation_md(res: dict | None, s: ReportSettings) -> list[str]:
    if res is None:
        return []
    (name, d), = res["directions"].items()
    grid = Path(d["grid"]).name
    moved = d["moved"]
    c = res["classifier"]
    i = c["names"].index(name)
    ap = c["test_ap"][i]
    return ["## Attribute manipulation", "",
            f"Attribute `{res['attribute']}`" + (f", class `{name}`" if res["kind"] == "categorical" else "")
            + f": z + s·√D·ŵ along a linear classifier's direction on standardised z (16 dims chosen by d′, "
            f"Adam lr {s.manip_lr:g}, 10 epochs, EMA 0.999; held-out AP {_fmt(ap)}), decoded unmasked from the "
            f"DDIM inversion. Row labels: the classifier's score of the input; the edited images' scores are in "
            f"report.json. The score rose at s = {max(res['scales']):g} for {moved.get('up', float('nan')):.0%} "
            f"and fell at s = {min(res['scales']):g} for {moved.get('down', float('nan')):.0%} of the images.", "",
            f"![manipulation]({grid})", ""]
