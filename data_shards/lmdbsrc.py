"""The ``lmdb`` source: image datasets stored as one LMDB environment, the layout DiTi's and PDAE's
code read (made by Diff-AE's preparation scripts).

Layout (one LMDB environment, a directory holding data.mdb):

    b"length"            -> the number of images, as decimal ASCII ("70000")
    b"<res>-<index>"     -> the encoded image file (JPEG, PNG, WebP: whatever PIL opens)

with ``<res>`` and the zero-padding of ``<index>`` fixed per dataset:

    ffhq      256-00042     (5 digits)   images 256x256, resized to --size
    bedroom   256-0000042   (7 digits)   images 256x256, resized to --size
    celeba64  None-0000042  (7 digits)   CelebA's aligned 178x218 images in file order (000001.jpg is
                                         index 0), all splits in one environment: train are indices
                                         0..162769, valid the next 19867, test the last 19963 (an
                                         offset per split); cropped like the celeba source (the
                                         128x128 face box at rows 57.., columns 25..) and resized.

``auto`` picks the layout from the keys present at index 0. Attributes come from a file in
``list_attr_celeba.txt``'s format (count line, header line, "NAME v1 v2 ..." rows of -1/1), whose
i-th row belongs to LMDB index i. A key that is absent or a value that does not decode as an image
is skipped, counted and named in the manifest (``skipped_sources``), never dropped silently.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from diti_fast.data.errors import DataFormatError, MissingFileError

from .celeba import CROP_LEFT, CROP_SIZE, CROP_TOP, SPLITS, read_attributes
from .images import center_square, resize_square
from .tarwrite import Sample, Skipped

# layout -> (key prefix, digits of the zero-padded index)
LAYOUTS = {"ffhq": ("256", 5), "bedroom": ("256", 7), "celeba64": ("None", 7)}
# CelebA's official partition, in the order the split offsets add up: train, valid, test.
CELEBA_SPLIT_SIZES = (162770, 19867, 19963)
LENGTH_KEY = b"length"


class LmdbMissingError(DataFormatError):
    """The optional ``lmdb`` package is not installed."""


def _lmdb():
    try:
        import lmdb  # lazy: an optional package (the lmdb extra), needed only by --source lmdb
    except ModuleNotFoundError:
        raise LmdbMissingError("--source lmdb needs the lmdb package: pip install 'diti-fast[lmdb]' "
                               "(or pip install lmdb)") from None
    return lmdb


def open_env(path: str | Path):
    """A read-only environment (no lock file written next to someone else's data)."""
    lmdb = _lmdb()
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such LMDB environment (a directory holding data.mdb)")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                         subdir=path.is_dir(), max_readers=64)
    except lmdb.Error as exc:
        raise DataFormatError(f"{path}: cannot open as an LMDB environment ({exc})") from None


def key_of(layout: str, index: int) -> str:
    prefix, digits = LAYOUTS[layout]
    return f"{prefix}-{str(index).zfill(digits)}"


def detect_layout(txn, path: Path) -> str:
    found = [name for name in LAYOUTS if txn.get(key_of(name, 0).encode()) is not None]
    if len(found) != 1:
        tried = ", ".join(f"{key_of(n, 0)!r} ({n})" for n in LAYOUTS)
        raise DataFormatError(f"{path}: cannot tell the layout from the keys (tried {tried}; "
                              f"{'none' if not found else ' and '.join(found)} present); pass --layout")
    return found[0]


def read_length(txn, path: Path) -> int:
    raw = txn.get(LENGTH_KEY)
    if raw is None:
        raise DataFormatError(f"{path}: no 'length' key (Diff-AE's preparation scripts write the image count "
                              "there); is this one of the original's LMDB datasets?")
    try:
        n = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataFormatError(f"{path}: the 'length' key holds {raw[:40]!r}, not an image count") from None
    if n < 1:
        raise DataFormatError(f"{path}: the 'length' key says {n} images")
    return n


def split_ranges(sizes: tuple[int, ...], length: int, path: Path) -> dict[str, range]:
    """{split: LMDB indices} from the split sizes (offsets are their running sums)."""
    if len(sizes) != len(SPLITS) or any(s < 0 for s in sizes):
        raise DataFormatError(f"--split-sizes: expected {len(SPLITS)} non-negative counts "
                              f"({', '.join(SPLITS)}), got {list(sizes)}")
    if sum(sizes) > length:
        raise DataFormatError(f"{path}: the splits {dict(zip(SPLITS, sizes))} need {sum(sizes)} images but the "
                              f"'length' key says {length}; give this dataset's sizes with --split-sizes")
    out, start = {}, 0
    for name, n in zip(SPLITS, sizes):
        out[name] = range(start, start + n)
        start += n
    return out


def decode(data: bytes, layout: str, image_size: int, resample: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = img.convert("RGB")
    if layout == "celeba64":
        w, h = img.size
        if w < CROP_LEFT + CROP_SIZE or h < CROP_TOP + CROP_SIZE:
            raise ValueError(f"image is {w}x{h}, too small for the {CROP_SIZE}px crop at ({CROP_LEFT},{CROP_TOP})")
        img = img.crop((CROP_LEFT, CROP_TOP, CROP_LEFT + CROP_SIZE, CROP_TOP + CROP_SIZE))
    else:
        img = center_square(img)
    return resize_square(img, image_size, resample)


def render_lmdb(items: list, path: str, layout: str, image_size: int, resample: str):
    """Worker side: each worker opens its own read-only environment."""
    env = open_env(path)
    try:
        with env.begin(buffers=False) as txn:
            for index, key, attrs in items:
                data = txn.get(key.encode())
                if data is None:
                    yield Skipped(index, key, "missing key: the LMDB has no value under this key")
                    continue
                try:
                    image = decode(data, layout, image_size, resample)
                except Exception as exc:  # a corrupt value: skipped, counted and named
                    yield Skipped(index, key, f"corrupt value ({len(data)} bytes): {type(exc).__name__}: {exc}")
                    continue
                yield Sample(index=index, image=image, attrs=attrs, src=key)
    finally:
        env.close()


def plan_lmdb(path, *, image_size: int, layout: str = "auto", attrs: Path | None = None,
              split_sizes: tuple[int, ...] | None = None, resample: str = "bicubic"):
    """({split or None: items}, attribute specs, render, config). Everything about the input is checked
    here, before any shard is written."""
    path = Path(path)
    env = open_env(path)
    try:
        with env.begin() as txn:
            if layout == "auto":
                layout = detect_layout(txn, path)
            elif layout not in LAYOUTS:
                raise DataFormatError(f"--layout {layout!r}: choose from auto, {', '.join(LAYOUTS)}")
            length = read_length(txn, path)
    finally:
        env.close()
    names, rows = [], None
    if attrs is not None:
        names, table = read_attributes(Path(attrs))
        rows = list(table.values())  # i-th row <-> LMDB index i
        if len(rows) < length:
            raise DataFormatError(f"{attrs}:1: {len(rows)} attribute rows for the {length} images of {path} "
                                  "(row i belongs to LMDB index i)")
    if layout == "celeba64":
        ranges = split_ranges(tuple(split_sizes or CELEBA_SPLIT_SIZES), length, path)
    else:
        if split_sizes is not None:
            raise DataFormatError(f"--split-sizes applies to the celeba64 layout, not {layout}")
        ranges = {None: range(length)}
    items = {split: [(i, key_of(layout, i), rows[i] if rows is not None else None) for i in r]
             for split, r in ranges.items()}
    attributes = [{"name": n, "kind": "binary"} for n in names]
    config = {"lmdb": str(path.resolve()), "layout": layout, "length": length, "resample": resample,
              "crop": [CROP_TOP, CROP_LEFT, CROP_SIZE] if layout == "celeba64" else "center",
              "split_sizes": [len(r) for r in ranges.values()] if layout == "celeba64" else None,
              "attr_file": str(Path(attrs).resolve()) if attrs is not None else None}
    render = partial(render_lmdb, path=str(path), layout=layout, image_size=image_size, resample=resample)
    return items, attributes, render, config
