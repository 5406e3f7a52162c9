"""The ``celeba`` source: CelebA's official aligned layout.

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                                   then "000001.jpg  -1  1 ..." (one ±1 per attribute)
    ROOT/list_eval_partition.txt   "000001.jpg 0" (0 train, 1 valid, 2 test)

Each image is cropped like the original pipeline (rows 57..185, columns 25..153: a 128×128 face
box) and then resized to the training resolution. Attributes are stored as 0/1.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from diti_fast.data.errors import DataFormatError

from diti_fast.data.errors import MissingFileError
from .images import load_rgb, resize_square
from .tarwrite import Sample, Skipped

SPLITS = ("train", "valid", "test")
CROP_TOP, CROP_LEFT, CROP_SIZE = 57, 25, 128
IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"


def _require(path: Path) -> Path:
    if not path.exists():
        raise MissingFileError(f"{path}: not found (expected CelebA's official layout)")
    return path


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Attribute names and {image file name: 0/1 float32 vector}; errors name file and line."""
    lines = _require(path).read_text(encoding="utf-8").splitlines()
    if len(lines) < 2:
        raise DataFormatError(f"{path}:{len(lines) + 1}: expected an image count line and a header line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataFormatError(f"{path}:1: expected the image count, got {lines[0].strip()!r}") from None
    names = lines[1].split()
    if not names:
        raise DataFormatError(f"{path}:2: empty attribute header")
    table: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != len(names) + 1:
            raise DataFormatError(
                f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(cells)} fields"
            )
        values = np.empty(len(names), np.float32)
        for j, cell in enumerate(cells[1:]):
            if cell == "1":
                values[j] = 1.0
            elif cell in ("-1", "0"):
                values[j] = 0.0
            else:
                raise DataFormatError(f"{path}:{lineno}: attribute {names[j]!r}: {cell!r} is not -1 or 1")
        if cells[0] in table:
            raise DataFormatError(f"{path}:{lineno}: duplicate image {cells[0]!r}")
        table[cells[0]] = values
    if len(table) != count:
        raise DataFormatError(f"{path}:1: header says {count} images, file lists {len(table)}")
    return names, table


def read_partition(path: Path) -> dict[str, tuple[str, int]]:
    """{image file name: (split name, line number)}."""
    out: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), start=1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != 2 or cells[1] not in ("0", "1", "2"):
            raise DataFormatError(f"{path}:{lineno}: expected '<file> <0|1|2>', got {line.strip()!r}")
        if cells[0] in out:
            raise DataFormatError(f"{path}:{lineno}: duplicate image {cells[0]!r}")
        out[cells[0]] = (SPLITS[int(cells[1])], lineno)
    return out


def crop_and_resize(path: Path, image_size: int, resample: str) -> np.ndarray:
    img = load_rgb(path)
    w, h = img.size
    if w < CROP_LEFT + CROP_SIZE or h < CROP_TOP + CROP_SIZE:
        raise ValueError(f"image is {w}x{h}, too small for the {CROP_SIZE}px crop at ({CROP_LEFT},{CROP_TOP})")
    box = (CROP_LEFT, CROP_TOP, CROP_LEFT + CROP_SIZE, CROP_TOP + CROP_SIZE)
    return resize_square(img.crop(box), image_size, resample)


def render_celeba(items: list, image_dir: str, image_size: int, resample: str):
    for index, name, attrs in items:
        path = Path(image_dir) / name
        try:
            image = crop_and_resize(path, image_size, resample)
        except Exception as exc:
            yield Skipped(index, f"{IMAGE_DIR}/{name}", f"{type(exc).__name__}: {exc}")
            continue
        yield Sample(index=index, image=image, attrs=attrs, src=f"{IMAGE_DIR}/{name}")


def plan_celeba(root, *, image_size: int, resample: str = "bilinear"):
    """{split: items}, attribute specs, render callable, config. Index = file number - 1."""
    root = Path(root)
    image_dir = _require(root / IMAGE_DIR)
    names, table = read_attributes(root / ATTR_FILE)
    partition = read_partition(root / PARTITION_FILE)
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for order, name in enumerate(sorted(partition)):
        split, lineno = partition[name]
        if name not in table:
            raise DataFormatError(f"{root / PARTITION_FILE}:{lineno}: image {name!r} has no row in {ATTR_FILE}")
        stem = Path(name).stem
        index = int(stem) - 1 if stem.isdigit() else order
        by_split[split].append((index, name, table[name]))
    attributes = [{"name": n, "kind": "binary"} for n in names]
    config = {
        "root": str(root.resolve()),
        "crop": [CROP_TOP, CROP_LEFT, CROP_SIZE],
        "resample": resample,
        "attr_file": _stat(root / ATTR_FILE),
        "partition_file": _stat(root / PARTITION_FILE),
    }
    render = partial(render_celeba, image_dir=str(image_dir), image_size=image_size, resample=resample)
    return by_split, attributes, render, config


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]
