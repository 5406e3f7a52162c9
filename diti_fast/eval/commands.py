"""Command-line wiring: ``diti-fast eval {probe,chunks,regress,counterfactual,interpolate,reconstruct,
manipulate,report}`` and
``diti-fast sample``. The main console script calls :func:`add_subcommands`; ``python -m diti_fast.eval``
exposes the same commands without the ``eval`` word.

Every handler turns the errors a user can cause (missing run, weights that do not fit the model, bad
data or options) into one ``error:`` line on stderr and exit status 2, without a traceback.

The probe, chunk, regress and report modules load scikit-learn and SciPy (about a second): they are
imported by the commands that use them, so that every other ``diti-fast`` command starts without.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..grids import save_grid
from ..weights import CheckpointError
from .counterfactual import (DEFAULT_ALPHAS, DEFAULT_LOC, DEFAULT_WIDTH, Sampler, counterfactuals, interpolation,
                             reconstructions)
from .features import (EvalError, cached_features, check_same_attributes, load_images, load_run, make_splits,
                       run_dir_of, split_by_position)
from .jsonable import jsonable
from .manipulate import ManipConfig, run_manipulation
from .quality import reconstruction_quality
from .sample import ddpm_samples

try:
    from ..data import DataError
except ImportError:  # the data package is optional for the pure-tensor parts
    class DataError(Exception):
        pass

USER_ERRORS = (EvalError, CheckpointError, ConfigError, DataError, FileNotFoundError)


def _guard(fn):
    @functools.wraps(fn)
    def run(args) -> int:
        try:
            return fn(args) or 0
        except USER_ERRORS as e:
            print(f"diti-fast: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return run


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _pair(s: str) -> tuple[int, int]:
    v = _ints(s)
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected two positions A,B, got {s!r}")
    return v[0], v[1]


def _range(s: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a chunk range LO:HI, got {s!r}") from None
    return lo, hi


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except the uninformative None/False ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _adder(sub):
    """sub.add_parser with the defaults-showing help formatter."""
    return functools.partial(sub.add_parser, formatter_class=_HelpFormatter)


def _show_defaults(sub) -> None:
    """argparse prints no help line (and so no default) for an option without help text: give such
    options one that is just their default."""
    for parser in sub.choices.values():
        for action in parser._actions:
            if action.help is None and not (action.default is None or action.default is False
                                            or action.default is argparse.SUPPRESS):
                action.help = "default: %(default)s"


# --------------------------------------------------------------------------- shared options

def _run_data(p: argparse.ArgumentParser, splits: bool = False) -> None:
    p.add_argument("--run", required=True, help="run directory (holding export/ema.safetensors) or an export file")
    p.add_argument("--data", required=True, help="shard set: a directory with manifest.json, a pattern or a list")
    if splits:
        p.add_argument("--val-data", help="validation shard set (default: carved from --data)")
        p.add_argument("--test-data", help="test shard set (default: carved from --data)")
    p.add_argument("--device", help="default: cuda when available, else cpu")


def _probe_opts(p: argparse.ArgumentParser, epochs: int = 15) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128, help="probe batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise features with train mean/std (the paper feeds raw features)")
    p.add_argument("--max-samples", type=int, help="cap on samples read from each shard set")
    p.add_argument("--feature-batch", type=int, default=256, help="batch of the feature extraction pass")
    p.add_argument("--num-workers", type=int, default=0)


def _ddim_opts(p: argparse.ArgumentParser, steps: int = 100, invert: int = 1000) -> None:
    p.add_argument("--steps", type=int, default=steps, help="reverse masked-DDIM steps")
    p.add_argument("--invert-steps", type=int, default=invert, help="inversion steps (the original: 1000)")


def _splits(args, device):
    ex = load_run(args.run, device)

    def feats(path):
        return cached_features(args.run, path, ex.encoder, device, args.feature_batch, args.max_samples,
                               args.num_workers, log=lambda m: print(m, file=sys.stderr))

    sets = [feats(args.data)] + [feats(p) if p else None for p in (args.val_data, args.test_data)]
    check_same_attributes(*[s for s in sets if s is not None])
    return ex, make_splits(*sets)


def _probe_cfg(args, device):
    from .probe import ProbeConfig  # lazy: sklearn, ~1 s
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise EvalError("--epochs and --batch-size must be >= 1 and --lr > 0")
    return ProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       standardize=args.standardize, device=device)


def _out(args, default_name: str) -> Path:
    out = Path(args.out) if args.out else run_dir_of(args.run) / "eval" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- handlers

@_guard
def cmd_probe(args) -> int:
    from .probe import format_probe_table, specs_from_manifest, train_probe  # lazy: sklearn, ~1 s
    device = _device(args.device)
    _, sp = _splits(args, device)
    specs = specs_from_manifest(sp.train.attributes)
    res = train_probe(*[(s.z, s.attrs) for s in (sp.train, sp.val, sp.test)], specs, _probe_cfg(args, device))
    print(f"split: {sp.description}")
    print(format_probe_table(res))
    out = _out(args, "probe.json")
    out.write_text(json.dumps(jsonable({**res.to_json(), "split": sp.description}), indent=1))
    print(f"wrote {out}")
    return 0


@_guard
def cmd_chunks(args) -> int:
    from .chunks import chunk_attribution, chunk_groups, format_chunk_table, plot_heatmap  # lazy: sklearn, ~1 s
    from .probe import specs_from_manifest  # lazy: sklearn, ~1 s
    device = _device(args.device)
    ex, sp = _splits(args, device)
    specs = specs_from_manifest(sp.train.attributes)
    groups = chunk_groups(ex.model_cfg, args.groups)
    table = chunk_attribution(sp, specs, groups, _probe_cfg(args, device), log=lambda m: print(m, file=sys.stderr))
    out = _out(args, "chunks.json")
    md = "\n\n".join([f"split: {sp.description}", "## group alone", format_chunk_table(table, "alone"),
                      "## cumulative prefix", format_chunk_table(table, "prefix")])
    print(md)
    out.write_text(json.dumps(jsonable(table.to_json()), indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    plot_heatmap(table, out.with_name(out.stem + "_heatmap.png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_name(out.stem + '_heatmap.png')}")
    return 0


def _sampler_and_images(args, positions):
    device = _device(args.device)
    ex = load_run(args.run, device)
    return Sampler(ex, device), load_images(args.data, positions, device)


@_guard
def cmd_counterfactual(args) -> int:
    if len(args.loc) != len(args.width):
        raise EvalError(f"--loc has {len(args.loc)} entries but --width has {len(args.width)}")
    sampler, x = _sampler_and_images(args, list(args.pair))
    ranges = [(lo, lo + w) for lo, w in zip(args.loc, args.width)]
    imgs, labels = counterfactuals(sampler, x[:1], x[1:], ranges, args.alphas, args.steps, args.invert_steps,
                                   mirror=args.mirror, slerp_noise=not args.fixed_noise)
    out = save_grid(_out(args, f"counterfactual_{args.pair[0]}_{args.pair[1]}.png"), imgs, labels,
                    [f"α={a:g}" for a in args.alphas],
                    title=f"A = #{args.pair[0]}, B = #{args.pair[1]}; "
                          f"{args.invert_steps} inversion / {args.steps} DDIM steps")
    print(f"wrote {out}")
    return 0


@_guard
def cmd_interpolate(args) -> int:
    alphas = args.alphas or [float(a) for a in np.linspace(0, 1, args.num)]
    sampler, x = _sampler_and_images(args, list(args.pair))
    imgs, labels = interpolation(sampler, x[:1], x[1:], args.chunks, alphas, args.steps, args.invert_steps)
    out = save_grid(_out(args, f"interpolate_{args.pair[0]}_{args.pair[1]}.png"), imgs, labels,
                    [f"α={a:.2g}" for a in alphas])
    print(f"wrote {out}")
    return 0


@_guard
def cmd_reconstruct(args) -> int:
    sampler, x = _sampler_and_images(args, args.indices)
    rows, labels, mse = reconstructions(sampler, x, args.steps, args.invert_steps, args.seed, args.ddpm_row)
    out = save_grid(_out(args, "reconstruction.png"), rows, labels, [f"#{i}" for i in args.indices])
    q = reconstruction_quality(x, rows[1])
    out.with_suffix(".json").write_text(json.dumps(jsonable({"indices": args.indices, "steps": args.steps,
                                                             "invert_steps": args.invert_steps, **q}), indent=1))
    print(f"reconstruction MSE ([-1, 1] units): {mse:.5f}; [0, 1] units: {q['mean_mse_01']:.5f}; "
          f"PSNR {q['mean_psnr_db']:.2f} dB; SSIM {q['mean_ssim']:.4f} (scikit-image)\n"
          f"wrote {out} and {out.with_suffix('.json')}")
    return 0


@_guard
def cmd_regress(args) -> int:
    from .regress import RegressConfig, format_regress_table, regress  # lazy: sklearn, ~1 s
    device = _device(args.device)
    ex = load_run(args.run, device)

    def feats(path):
        return cached_features(args.run, path, ex.encoder, device, args.feature_batch, args.max_samples,
                               args.num_workers, log=lambda m: print(m, file=sys.stderr))

    train = feats(args.data)
    if args.test_data:
        test, split = feats(args.test_data), "train: --data, test: --test-data"
    else:
        parts = split_by_position(train, ("train", "test"))
        train, test, split = parts["train"], parts["test"], "--data split by position mod 10: 0-8 train, 9 test"
    res = regress(train, test, RegressConfig(args.epochs, args.batch_size, args.lr, args.seed), args.attrs)
    print(f"split: {split}")
    print(format_regress_table(res))
    out = _out(args, "regress.json")
    out.write_text(json.dumps(jsonable({**res.to_json(), "split": split}), indent=1))
    print(f"wrote {out}")
    return 0


@_guard
def cmd_manipulate(args) -> int:
    cfg = ManipConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                      mask_dims=args.mask_dims, seed=args.seed)
    res = run_manipulation(args.run, args.data, args.attr, args.scales, _device(args.device), cfg, args.indices,
                           args.num, args.classes, args.steps, args.invert_steps, args.max_samples,
                           args.feature_batch, args.out, log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {res['json']}")
    return 0


@_guard
def cmd_report(args) -> int:
    from .probe import ProbeConfig  # lazy: sklearn, ~1 s
    from .report import ReportSettings, write_report  # lazy: sklearn, ~1 s
    device = _device(args.device)
    s = ReportSettings(max_samples=args.max_samples or None,
                       probe=ProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                         standardize=args.standardize, device=device),
                       n_groups=args.groups, steps=args.steps, invert_steps=args.invert_steps, seed=args.seed,
                       batch_size=args.feature_batch)
    path = write_report(args.run, args.data, device, s, args.val_data, args.test_data,
                        log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {path}")
    return 0


@_guard
def cmd_sample(args) -> int:
    device = _device(args.device)
    if args.num < 1 or args.steps < 1:
        raise EvalError("--num and --steps must be >= 1")
    ex = load_run(args.run, device, stage=None)
    x = ddpm_samples(ex, args.num, args.steps, args.seed, device, args.image_size)
    ncol = args.nrow or int(math.ceil(math.sqrt(args.num)))
    nrow = -(-args.num // ncol)
    pad = nrow * ncol - args.num
    if pad:
        x = torch.cat([x, torch.ones(pad, *x.shape[1:], device=x.device)])
    out = Path(args.out) if args.out else run_dir_of(args.run) / "eval" / "samples.png"
    save_grid(out, x.reshape(nrow, ncol, *x.shape[1:]), title=f"{args.num} DDPM samples, {args.steps} DDIM steps, "
              f"seed {args.seed}")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- registration

def add_eval_commands(sub) -> None:
    """Register probe, chunks, counterfactual, interpolate, reconstruct and report on ``sub``."""
    add_parser = _adder(sub)

    p = add_parser("probe", help="linear probe on frozen EMA encoder features (the paper's protocol)")
    _run_data(p, splits=True)
    _probe_opts(p)
    p.add_argument("--out", help="JSON of the results (default RUN/eval/probe.json)")
    p.set_defaults(func=cmd_probe)

    p = add_parser("chunks", help="per-chunk attribution: probe each attribute from each stage's chunks")
    _run_data(p, splits=True)
    _probe_opts(p)
    p.add_argument("--groups", type=int, default=8, help="number of chunk groups for balanced masks")
    p.add_argument("--out", help="JSON of the table (default RUN/eval/chunks.json; .md and _heatmap.png beside)")
    p.set_defaults(func=cmd_chunks)

    p = add_parser("counterfactual", help="swap chunk ranges of z between two images (labelled PNG grid)")
    _run_data(p)
    p.add_argument("--pair", type=_pair, default=(0, 1), help="positions A,B of the two images in --data")
    p.add_argument("--loc", type=_ints, default=list(DEFAULT_LOC), help="first chunk of each range")
    p.add_argument("--width", type=_ints, default=list(DEFAULT_WIDTH), help="chunks in each range")
    p.add_argument("--alphas", type=_floats, default=list(DEFAULT_ALPHAS))
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="also the rows of B receiving A's chunks")
    p.add_argument("--fixed-noise", action="store_true",
                   help="keep each row's own inverted x_T instead of slerping it (the original's lerpT=False)")
    _ddim_opts(p)
    p.add_argument("--out", help="PNG path (default RUN/eval/counterfactual_A_B.png)")
    p.set_defaults(func=cmd_counterfactual)

    p = add_parser("interpolate", help="interpolate z on a chunk range (all of z by default) and slerp x_T")
    _run_data(p)
    p.add_argument("--pair", type=_pair, default=(0, 1))
    p.add_argument("--chunks", type=_range, default=None, help="chunk range LO:HI (default: all chunks)")
    p.add_argument("--num", type=int, default=9, help="number of evenly spaced α in [0, 1]")
    p.add_argument("--alphas", type=_floats, default=None, help="explicit α list (overrides --num)")
    _ddim_opts(p)
    p.add_argument("--out")
    p.set_defaults(func=cmd_interpolate)

    p = add_parser("reconstruct", help="invert and decode images (plain reconstruction)")
    _run_data(p)
    p.add_argument("--indices", type=_ints, default=list(range(8)), help="positions of the images in --data")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh-noise row")
    p.add_argument("--ddpm-row", action="store_true", help="add the frozen DDPM alone from the inverted x_T")
    _ddim_opts(p)
    p.add_argument("--out")
    p.set_defaults(func=cmd_reconstruct)

    p = add_parser("regress", help="the original's attribute regression: Linear, MSE on raw targets "
                                       "(Adam 1e-3, batch 64, 15 epochs), test Pearson r / MSE per epoch")
    _run_data(p)
    p.add_argument("--test-data", help="test shard set (default: position mod 10 = 9 of --data)")
    p.add_argument("--attrs", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help="comma-separated continuous attributes (default: every continuous attribute)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, help="cap on samples read from each shard set")
    p.add_argument("--feature-batch", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", help="JSON of the results (default RUN/eval/regress.json)")
    p.set_defaults(func=cmd_regress)

    p = add_parser("manipulate", help="edit images along an attribute's linear-classifier direction in z")
    _run_data(p)
    p.add_argument("--attr", required=True, help="a binary or categorical attribute of the data's manifest")
    p.add_argument("--class", dest="classes", action="append",
                   help="class of a categorical attribute to edit towards (repeatable; default: every class)")
    p.add_argument("--scales", type=_floats, default=[-1.0, -0.6, -0.2, 0.0, 0.2, 0.6, 1.0],
                   help="edit strengths s in z + s·√D·ŵ (the notebook: -1 to 1 in steps of .2)")
    p.add_argument("--indices", type=_ints, help="positions of the images to edit (default: the first --num "
                   "of the held-out split, position mod 10 = 9)")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--mask-dims", type=int, default=16, help="dims kept by the d′ sparsity mask (0 = all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, help="cap on samples read from --data")
    p.add_argument("--feature-batch", type=int, default=256)
    _ddim_opts(p, steps=100, invert=1000)
    p.add_argument("--out", help="output folder (default RUN/eval/manipulate; statistics and classifiers are "
                   "always cached there)")
    p.set_defaults(func=cmd_manipulate)

    p = add_parser("report", help="write RUN/report/report.md with probes, chunk heatmap and grids")
    _run_data(p, splits=True)
    _probe_opts(p)
    p.set_defaults(max_samples=4000, standardize=True, lr=1e-2)  # small-data settings, see ReportSettings
    p.add_argument("--groups", type=int, default=8)
    _ddim_opts(p, steps=20, invert=20)
    p.set_defaults(func=cmd_report)
    _show_defaults(sub)


def add_sample_command(sub) -> None:
    p = _adder(sub)("sample", help="DDPM samples (DDIM) from a ddpm export or a DiTi export's frozen DDPM")
    p.add_argument("--run", required=True)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, help="images per grid row (default: square)")
    p.add_argument("--image-size", type=int, help="needed only when the export does not record it")
    p.add_argument("--device")
    p.add_argument("--out", help="PNG path (default RUN/eval/samples.png)")
    p.set_defaults(func=cmd_sample)
    _show_defaults(sub)


def add_subcommands(subparsers) -> None:
    """Hook for the main ``diti-fast`` parser: adds ``eval <command>`` and ``sample``. Handlers are stored
    as ``func`` (``args.func(args)`` returns the exit status)."""
    p = _adder(subparsers)("eval", help="evaluate a trained run: probes, chunk attribution, grids, report")
    add_eval_commands(p.add_subparsers(dest="eval_command", required=True, metavar="COMMAND"))
    add_sample_command(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m diti_fast.eval COMMAND ...`` (the eval commands plus ``sample``)."""
    parser = argparse.ArgumentParser(prog="python -m diti_fast.eval",
                                     description="DiTi evaluation: linear probes, per-chunk attribution, "
                                                 "counterfactuals, reconstructions, DDPM samples, the report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_commands(sub)
    add_sample_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)
