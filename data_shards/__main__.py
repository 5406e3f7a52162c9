"""``python -m data_shards``: make WebDataset tar shards for diti-fast, or verify them.

    python -m data_shards make --source synthetic --num 10000 --image-size 32 --out data/syn
    python -m data_shards make --source celeba --root ~/celeba --size 64 --out data/celeba64
    python -m data_shards make --source folder --root ~/imgs --attrs labels.csv --size 64 --out d
    python -m data_shards make --source lmdb --root celeba64.lmdb --attrs list_attr_celeba.txt --size 64 --out d
    python -m data_shards verify data/syn
    python -m data_shards lfw-attrs lfw_attributes.txt --out lfw_attributes.csv [--people peopleDevTrain.txt]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from diti_fast.data.errors import DataError, DataWarning
from diti_fast.data.manifest import IMAGE_FORMATS, read_manifest

from .celeba import SPLITS, plan_celeba
from .folder import plan_folder, shuffled
from .images import RESAMPLE
from .lfw import convert
from .lmdbsrc import plan_lmdb
from .synthetic import make_synthetic_shards
from .writer import check_out_dir, check_target, write_shards

SOURCES = ("synthetic", "folder", "ffhq", "lsun", "celeba", "lmdb")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the uninformative None/False ones."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_shards",
        description="Pre-process an image dataset once into WebDataset tar shards for diti-fast.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "make",
        help="write a shard set (tar shards + manifest.json)",
        description=(
            "Write tar shards of images already resized to the training resolution, with per-sample "
            "attributes, plus manifest.json (sample count, image size, attribute names and kinds, "
            "per-shard sha256). An output directory that already holds a shard set is refused unless "
            "--overwrite is given; the new set is then written beside it and takes its place only "
            "when complete (shards already written with the same settings are reused). A directory "
            "holding unrelated files is refused."
        ),
        formatter_class=_HelpFormatter,
    )
    m.add_argument("--source", required=True, choices=SOURCES,
                   help="synthetic: the embedded generated dataset with known factors; folder: any image tree "
                        "(recursive), optionally with --attrs; ffhq, lsun: aliases of folder for those datasets "
                        "exported as image folders; celeba: CelebA's official aligned layout (one shard set per split); "
                        "lmdb: the original DiTi/PDAE code's LMDB datasets (Diff-AE's preparation scripts; see --layout)")
    m.add_argument("--out", required=True, type=Path,
                   help="output directory (created if missing; must be empty, or an earlier output of this tool "
                        "with --overwrite). For celeba and lmdb's celeba64 layout, each split goes to OUT/<split>/")
    m.add_argument("--overwrite", action="store_true",
                   help="replace the shard set already in --out. The new set is written into .OUT.partial beside "
                        "it and renamed into place when complete: an interrupted run leaves the old set untouched "
                        "(and a re-run reuses the shards it wrote)")
    m.add_argument("--size", "--image-size", dest="size", type=_at_least(8), default=None,
                   help="training resolution: images are stored as SIZE×SIZE (default 32 for synthetic, 64 otherwise)")
    m.add_argument("--maxcount", type=_at_least(1), default=2000,
                   help="samples per shard (the last shard may hold fewer)")
    m.add_argument("--format", choices=IMAGE_FORMATS, default="u8",
                   help="image storage: u8 = raw uint8 CHW bytes (no decoding when loading; fastest), "
                        "png = lossless, smaller, slower to decode; jpg = lossy, smallest")
    m.add_argument("--quality", type=_at_least(1), default=95, help="JPEG quality for --format jpg")
    m.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1, help="parallel writer processes")
    m.add_argument("--prefix", default="shard", help="shard file names are PREFIX-000000.tar, ...")
    m.add_argument("--root", type=Path, help="input directory (folder/ffhq/lsun: the image tree; "
                                              "celeba: the folder holding img_align_celeba/ and the list files; "
                                              "lmdb: the LMDB environment, a directory holding data.mdb)")
    m.add_argument("--attrs", type=Path,
                   help="folder: CSV of per-image attributes: header row, first column the image path relative to "
                        "--root, one column per attribute (kinds inferred or given as name:binary, "
                        "name:categorical, name:continuous); when given, its rows define the sample set. "
                        "lmdb: a file in list_attr_celeba.txt's format whose i-th row belongs to LMDB index i")
    m.add_argument("--layout", choices=("auto", "ffhq", "bedroom", "celeba64"), default="auto",
                   help="lmdb: key layout: ffhq = '256-00042' (5 digits), bedroom = '256-0000042' (7 digits), "
                        "celeba64 = 'None-0000042' (all CelebA splits in one LMDB, cropped like --source celeba); "
                        "auto: from the keys present")
    m.add_argument("--split-sizes", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                   help="lmdb celeba64: images in train,valid,test, which set each split's offset "
                        "(default CelebA's 162770,19867,19963)")
    m.add_argument("--crop", choices=("center", "none", "resize-center"), default="center",
                   help="folder: 'center' crops non-square images to their central square before resizing; "
                        "'none' resizes (squashes) the whole image; 'resize-center' resizes the shorter side "
                        "to int(1.1 x size) and takes the central square (the original's attribute-regression "
                        "preprocessing: Resize(70) then CenterCrop(64))")
    m.add_argument("--resample", choices=sorted(RESAMPLE), default=None,
                   help="PIL resampling filter for resizing (PIL antialiases when shrinking). Default: bilinear "
                        "for celeba and lmdb (torchvision's Resize on PIL images, as the original), bicubic otherwise")
    m.add_argument("--split", default="all",
                   help=f"celeba: comma-separated splits to write, from {', '.join(SPLITS)}, or 'all'")
    m.add_argument("--num", type=_at_least(1), default=10000, help="synthetic: number of images")
    m.add_argument("--seed", type=int, default=0,
                   help="synthetic: generator seed; other sources: seed of the storage-order shuffle")
    m.add_argument("--no-shuffle", action="store_true",
                   help="folder/celeba: keep sorted source order in the shards instead of a seeded shuffle "
                        "(keys always carry the sorted index)")
    m.add_argument("--strict", action="store_true",
                   help="fail on an unreadable source image instead of skipping it and counting it; with --attrs, "
                        "also on CSV rows naming no image and images without a row (default: a warning)")
    m.add_argument("--verify", action="store_true",
                   help="on a re-run, re-hash existing shards before keeping them (without it: size check only)")
    m.add_argument("--no-progress", action="store_true", help="do not show the progress bar")

    lfw = sub.add_parser("lfw-attrs", help="LFW's lfw_attributes.txt -> the attribute CSV of --source folder",
                         formatter_class=_HelpFormatter,
                         description="Convert LFW's attribute file (tab-separated: person, imagenum, 73 "
                                     "attributes) into the CSV that 'make --source folder --attrs' reads: paths "
                                     "relative to lfw_funneled/, every attribute continuous.")
    lfw.add_argument("src", type=Path, help="lfw_attributes.txt")
    lfw.add_argument("--out", required=True, type=Path, help="the CSV to write")
    lfw.add_argument("--people", type=Path,
                     help="keep only the persons of an LFW people file (peopleDevTrain.txt / peopleDevTest.txt: "
                          "the original's train/test split)")

    v = sub.add_parser("verify", help="check every shard of a shard set against its manifest checksums")
    v.add_argument("dir", help="a directory holding manifest.json, a manifest path or a manifest URL "
                                "(http(s)://…/manifest.json); shards are read as the loader reads them")
    return parser


def _splits(args) -> tuple[str, ...]:
    return SPLITS if args.split == "all" else tuple(s.strip() for s in args.split.split(","))


def _make(args) -> int:
    size = args.size or (32 if args.source == "synthetic" else 64)
    if args.resample is None:
        args.resample = "bilinear" if args.source in ("celeba", "lmdb") else "bicubic"
    common = dict(image_format=args.format, quality=args.quality, maxcount=args.maxcount, workers=args.workers,
                  prefix=args.prefix, progress=not args.no_progress, verify=args.verify, overwrite=args.overwrite)
    # Refuse a taken output before any work (planning reads attribute tables and image trees).
    if args.source == "celeba":
        check_out_dir(args.out, args.prefix, allowed_dirs=SPLITS)
        for split in _splits(args):
            check_target(args.out / split, args.prefix, args.overwrite)
    else:
        check_target(args.out, args.prefix, args.overwrite)
    if args.source == "synthetic":
        manifest = make_synthetic_shards(args.out, args.num, image_size=size, seed=args.seed, **common)
        _report(args.out, manifest)
        return 0
    common.update(strict=args.strict)
    order = (lambda items: items) if args.no_shuffle else (lambda items: shuffled(items, args.seed))
    shuffle_cfg = {"shuffle": not args.no_shuffle, "seed": args.seed}

    def write_splits(by_split, source, attributes, render, config):
        """One shard set per split, OUT/<split>/."""
        for split in _splits(args):
            manifest = write_shards(
                args.out / split, items=order(by_split[split]), render=render, attributes=attributes,
                image_size=size, source=source, split=split, config=dict(config, split=split, **shuffle_cfg),
                **common,
            )
            _report(args.out / split, manifest)

    if args.source == "celeba":
        by_split, attributes, render, config = plan_celeba(args.root, image_size=size, resample=args.resample)
        write_splits(by_split, "celeba", attributes, render, config)
        return 0
    if args.source == "lmdb":
        by_split, attributes, render, config = plan_lmdb(
            args.root, image_size=size, layout=args.layout, attrs=args.attrs, split_sizes=args.split_sizes,
            resample=args.resample)
        if None in by_split:  # one shard set
            manifest = write_shards(args.out, items=order(by_split[None]), render=render, attributes=attributes,
                                    image_size=size, source="lmdb", config=dict(config, **shuffle_cfg), **common)
            _report(args.out, manifest)
            return 0
        check_out_dir(args.out, args.prefix, allowed_dirs=SPLITS)
        write_splits(by_split, "lmdb", attributes, render, config)
        return 0
    items, attributes, render, config, notes = plan_folder(
        args.root, args.attrs, image_size=size, crop=args.crop, resample=args.resample, strict=args.strict
    )
    manifest = write_shards(
        args.out, items=order(items), render=render, attributes=attributes, image_size=size,
        source=args.source, config=dict(config, **shuffle_cfg), notes=notes, **common,
    )
    _report(args.out, manifest)
    return 0


def _report(out: Path, manifest: dict) -> None:
    total = sum(s.get("bytes", 0) for s in manifest["shards"])
    print(f"{out}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
          f"{manifest['image_size']}px {manifest['image_format']}, {len(manifest['attributes'])} attributes, "
          f"{total / 2**20:.1f} MiB")
    skipped = manifest.get("num_skipped_sources", 0)
    if skipped:
        names = ", ".join(f"{s['src']} ({s['reason']})" for s in manifest["skipped_sources"][:5])
        print(f"{out}: skipped {skipped} source image(s), listed in manifest.json 'skipped_sources': {names}"
              + (" ..." if skipped > 5 else ""))


def _verify(args) -> int:
    from diti_fast.data.shard_reader import shard_sha256  # lazy: torch and webdataset, which only verify needs

    manifest = read_manifest(args.dir)
    bad = 0
    for s in manifest["shards"]:
        try:
            digest = shard_sha256(s["path"])
        except OSError as exc:
            print(f"{s['path']}: cannot read ({exc})", file=sys.stderr)
            bad += 1
            continue
        if digest != s["sha256"]:
            print(f"{s['path']}: checksum mismatch (sha256 {digest}, manifest {s['sha256']})", file=sys.stderr)
            bad += 1
    print(f"{args.dir}: {len(manifest['shards']) - bad}/{len(manifest['shards'])} shards OK")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "make":
        if args.source != "synthetic" and args.root is None:
            parser.error(f"--source {args.source} needs --root")
        if args.split != "all" and any(s.strip() not in SPLITS for s in args.split.split(",")):
            parser.error(f"--split: choose from {', '.join(SPLITS)} (comma-separated) or 'all'")
        if args.attrs is not None and args.source == "celeba":
            parser.error("--attrs is for folder sources; celeba reads list_attr_celeba.txt")
    warnings.simplefilter("always", DataWarning)
    try:
        if args.command == "lfw-attrs":
            counts = convert(args.src, args.out, args.people)
            print(f"{args.out}: {counts['rows']} images x {counts['attributes']} continuous attributes"
                  + (f" ({counts['left_out']} of other persons left out)" if args.people else ""))
            return 0
        return _make(args) if args.command == "make" else _verify(args)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
