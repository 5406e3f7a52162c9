"""The ``folder`` source (also used for FFHQ and LSUN exported to folders): any image tree,
optionally with a CSV of per-image attributes (see ``csvattrs``)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from diti_fast.data.errors import DataError, DataWarning, MissingFileError

from .csvattrs import read_attribute_csv
from .images import IMAGE_SUFFIXES, center_square, load_rgb, resize_square, resize_then_center_crop
from .tarwrite import Sample, Skipped


def list_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of every image under ``root`` (recursive, sorted, hidden skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"{root}: image folder not found")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def render_folder(items: list, root: str, image_size: int, crop: str, resample: str):
    """Writer callback: items are (index, relative path, attribute vector or None)."""
    for index, rel, attrs in items:
        try:
            img = load_rgb(Path(root) / rel)
            if crop == "resize-center":  # the original's LFW regression pipeline
                image = resize_then_center_crop(img, image_size, resample)
            else:
                if crop == "center":
                    img = center_square(img)
                image = resize_square(img, image_size, resample)
        except Exception as exc:  # unreadable sources are skipped and counted by the writer
            yield Skipped(index, rel, f"{type(exc).__name__}: {exc}")
            continue
        yield Sample(index=index, image=image, attrs=attrs, src=rel)


SHOWN = 5  # names quoted in the warning; the manifest records up to 100


def plan_folder(root, attrs_csv=None, *, image_size: int, crop: str = "center", resample: str = "bicubic",
                strict: bool = False):
    """(items in sorted order, attribute specs, render callable, config, notes) for the writer.

    With a CSV, the samples are the images that have a row. Rows naming no image under ``root``
    and images without a row are left out with one DataWarning giving both counts and the first
    names (recorded in the manifest's ``attrs_unmatched``); ``strict`` makes them an error naming
    the CSV line of the first missing image, or the first image without a row.
    """
    root = Path(root)
    images = list_images(root)
    attributes: list[dict] = []
    notes: dict = {}
    if attrs_csv is not None:
        attributes, table, lines = read_attribute_csv(attrs_csv)
        present = set(images)
        no_image = sorted((line, rel) for rel, line in lines.items() if rel not in present)
        no_row = [rel for rel in images if rel not in table]
        if no_image or no_row:
            if strict and no_image:
                line, rel = no_image[0]
                raise DataError(f"{attrs_csv}:{line}: image {rel!r} not found under {root} "
                                f"({len(no_image)} row(s) without an image; --strict)")
            if strict:
                raise DataError(f"{root / no_row[0]}: no row in {attrs_csv} "
                                f"({len(no_row)} image(s) without a row; --strict)")
            notes["attrs_unmatched"] = {
                "rows_without_image": len(no_image), "first_rows_without_image": [r for _, r in no_image[:100]],
                "images_without_row": len(no_row), "first_images_without_row": no_row[:100]}
            warnings.warn(
                f"data_shards: {attrs_csv}: {len(no_image)} row(s) name no image under {root}"
                + (f" (first: {', '.join(f'line {ln} {r!r}' for ln, r in no_image[:SHOWN])})" if no_image else "")
                + f"; {len(no_row)} image(s) have no row"
                + (f" (first: {', '.join(repr(r) for r in no_row[:SHOWN])})" if no_row else "")
                + "; both left out (recorded in the manifest as attrs_unmatched; --strict makes this an error)",
                DataWarning, stacklevel=2)
        listed = sorted(rel for rel in table if rel in present)
        if not listed:
            raise DataError(f"{attrs_csv}: none of its rows names an image under {root}")
        items = [(i, rel, table[rel]) for i, rel in enumerate(listed)]
    else:
        if not images:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        items = [(i, rel, None) for i, rel in enumerate(images)]
    # Stat data makes a re-run notice replaced source files without reading any pixels.
    stat = [(rel, *_stat(root / rel)) for _, rel, _ in items]
    config = {
        "root": str(root.resolve()),
        "attrs_csv": str(Path(attrs_csv).resolve()) if attrs_csv else None,
        "attrs_digest": _digest([(rel, a.tolist() if a is not None else None) for _, rel, a in items]),
        "files_digest": _digest(stat),
        "crop": crop,
        "resample": resample,
    }
    render = partial(render_folder, root=str(root), image_size=image_size, crop=crop, resample=resample)
    return items, attributes, render, config, notes


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def shuffled(items: list, seed: int) -> list:
    """Storage order: a seeded permutation, so a training stream reading shards sequentially gets
    well-mixed samples even with a small shuffle buffer. Keys keep the sorted index."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(items))
    return [items[i] for i in order]
