"""The embedded dataset: procedurally drawn images whose generating factors are all known.

Each image is one flat-coloured shape on a dark background, overlaid with a low-amplitude stripe
texture and sparse single-pixel speckle:

* coarse factors (large-scale, high contrast, survive heavy diffusion noise): ``shape`` (circle,
  square, triangle), ``colour`` (6-colour palette), ``pos_x``/``pos_y`` (centre, fraction of the
  side), ``size`` (half-extent, fraction of the side);
* fine factors (a few pixels in scale, a few grey levels in amplitude, destroyed by little noise):
  ``stripe_period`` (2.5/3/4 px), ``stripe_orientation`` (0/45/90/135 deg), ``stripe_phase``, and
  ``speckle`` (fraction of pixels hit by a ±48 single-pixel dot).

Sample ``i`` depends only on ``(seed, i, image_size)``: its random numbers come from its own
generator, so output is identical whatever the worker count, shard size or ``num``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .tarwrite import Sample
from .writer import write_shards

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 60, 50),
    "green": (60, 190, 70),
    "blue": (60, 100, 230),
    "yellow": (225, 205, 50),
    "magenta": (200, 70, 200),
    "cyan": (60, 200, 210),
}
BACKGROUND = (28, 28, 28)
STRIPE_PERIODS = (2.5, 3.0, 4.0)  # pixels, independent of image size: fine stays fine
STRIPE_ORIENTATIONS = (0, 45, 90, 135)  # degrees; 0 = intensity varies along x
STRIPE_AMPLITUDE = 12.0  # grey levels (≈0.09 in [-1, 1] model units)
SPECKLE_AMPLITUDE = 48.0
SPECKLE_MAX = 0.12
SIZE_RANGE = (0.18, 0.32)  # half-extent / side

ATTRIBUTES = [
    {"name": "shape", "kind": "categorical", "num_classes": len(SHAPES), "classes": list(SHAPES), "group": "coarse"},
    {"name": "colour", "kind": "categorical", "num_classes": len(COLOURS), "classes": list(COLOURS), "group": "coarse"},
    {"name": "pos_x", "kind": "continuous", "group": "coarse"},
    {"name": "pos_y", "kind": "continuous", "group": "coarse"},
    {"name": "size", "kind": "continuous", "group": "coarse"},
    {"name": "stripe_period", "kind": "categorical", "num_classes": len(STRIPE_PERIODS),
     "classes": [f"{p:g}px" for p in STRIPE_PERIODS], "group": "fine"},
    {"name": "stripe_orientation", "kind": "categorical", "num_classes": len(STRIPE_ORIENTATIONS),
     "classes": [f"{a}deg" for a in STRIPE_ORIENTATIONS], "group": "fine"},
    {"name": "stripe_phase", "kind": "continuous", "group": "fine"},
    {"name": "speckle", "kind": "continuous", "group": "fine"},
]
ATTRIBUTE_NAMES = [a["name"] for a in ATTRIBUTES]
_PIXELS_PER_CHUNK = 1 << 19  # bounds the float32 working set of one vectorised chunk (~24 MB)


def _factors(seed: int, indices: np.ndarray, size: int):
    """Per-sample factors and speckle fields, each from the sample's own generator."""
    n = len(indices)
    f = {k: np.empty(n, np.float64) for k in ATTRIBUTE_NAMES}
    speckle = np.empty((n, size, size), np.float32)
    for j, idx in enumerate(indices):
        rng = np.random.default_rng([seed, int(idx)])
        f["shape"][j] = rng.integers(len(SHAPES))
        f["colour"][j] = rng.integers(len(COLOURS))
        r = rng.uniform(*SIZE_RANGE)
        f["size"][j] = r
        # Keep the whole shape (plus a pixel) inside the frame.
        lo, hi = r + 1.0 / size, 1.0 - r - 1.0 / size
        f["pos_x"][j] = rng.uniform(lo, hi)
        f["pos_y"][j] = rng.uniform(lo, hi)
        f["stripe_period"][j] = rng.integers(len(STRIPE_PERIODS))
        f["stripe_orientation"][j] = rng.integers(len(STRIPE_ORIENTATIONS))
        f["stripe_phase"][j] = rng.uniform(0.0, 2 * np.pi)
        density = rng.uniform(0.0, SPECKLE_MAX)
        f["speckle"][j] = density
        hit = rng.random((size, size)) < density
        sign = np.where(rng.random((size, size)) < 0.5, -1.0, 1.0)
        speckle[j] = hit * sign * SPECKLE_AMPLITUDE
    return f, speckle


def render(indices, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 N×S×S×3) and attributes (float32 N×A, ``ATTRIBUTES`` order) for ``indices``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    s = int(image_size)
    if s < 8:
        raise ValueError("image_size must be at least 8")
    images = np.empty((len(indices), s, s, 3), np.uint8)
    attrs = np.empty((len(indices), len(ATTRIBUTES)), np.float32)
    step = max(1, _PIXELS_PER_CHUNK // (s * s))
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s  # pixel centres, in side fractions
    palette = np.array(list(COLOURS.values()), np.float32)
    for a in range(0, len(indices), step):
        idx = indices[a:a + step]
        f, speckle = _factors(seed, idx, s)
        dx = coords[None, None, :] - f["pos_x"].astype(np.float32)[:, None, None]
        dy = coords[None, :, None] - f["pos_y"].astype(np.float32)[:, None, None]
        r = f["size"].astype(np.float32)[:, None, None]
        # All three shapes share the bounding box [c-r, c+r]², so shape is the only thing that
        # changes the fill ratio (circle π/4, square 1, triangle 1/2).
        circle = dx * dx + dy * dy <= r * r
        square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        triangle = (dy <= r) & (2 * np.abs(dx) <= dy + r)  # apex up
        shape = f["shape"].astype(np.int64)[:, None, None]
        mask = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
        colour = palette[f["colour"].astype(np.int64)]  # n×3
        img = np.where(mask[..., None], colour[:, None, None, :], np.array(BACKGROUND, np.float32))
        theta = np.deg2rad(np.array(STRIPE_ORIENTATIONS, np.float32)[f["stripe_orientation"].astype(np.int64)])
        period = np.array(STRIPE_PERIODS, np.float32)[f["stripe_period"].astype(np.int64)]
        px = coords * s  # pixel units for the texture
        u = (px[None, None, :] * np.cos(theta)[:, None, None] + px[None, :, None] * np.sin(theta)[:, None, None])
        stripes = STRIPE_AMPLITUDE * np.cos(
            2 * np.pi * u / period[:, None, None] + f["stripe_phase"].astype(np.float32)[:, None, None]
        )
        img += (stripes + speckle)[..., None]
        images[a:a + step] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        attrs[a:a + step] = np.stack([f[k] for k in ATTRIBUTE_NAMES], axis=1)
    return images, attrs


def render_samples(indices: list, image_size: int, seed: int, render_fn=None):
    """Writer callback: yields one Sample per index (runs inside a writer worker). ``render_fn``:
    another variant's ``render`` (default: this module's)."""
    images, attrs = (render_fn or render)(indices, image_size, seed)
    for i, idx in enumerate(indices):
        yield Sample(index=int(idx), image=images[i], attrs=attrs[i])


@dataclass(frozen=True)
class Variant:
    """A synthetic dataset's generator: how a set of it is written and recorded in its manifest."""
    name: str
    generator: int                 # recorded in the manifest's config (generator 1: the classic variant)
    render: Callable               # (indices, image_size, seed) -> (images, attributes), like :func:`render`
    attributes: list               # the manifest's attribute list, in ``render``'s column order


CLASSIC = Variant("classic", 1, render, ATTRIBUTES)


def make_synthetic_shards(
    out_dir: str | os.PathLike,
    num: int,
    image_size: int = 32,
    seed: int = 0,
    maxcount: int = 2000,
    workers: int = 1,
    image_format: str = "u8",
    quality: int = 95,
    progress: bool = False,
    prefix: str = "shard",
    verify: bool = False,
    variant: Variant = CLASSIC,
    overwrite: bool = False,
) -> dict:
    """Write ``num`` synthetic samples as shards into ``out_dir``; returns the manifest.

    ``variant``: :data:`CLASSIC` (this module) or ``synthetic_clear.CLEAR`` (visible fine factors,
    independent factors; made for the claim run). ``overwrite``: replace a shard set
    already in ``out_dir`` (otherwise refused; see ``writer.write_shards``)."""
    if num < 1:
        raise ValueError("num must be >= 1")
    if not isinstance(variant, Variant):
        raise ValueError(f"unknown synthetic variant {variant!r}; pass a data_shards.synthetic.Variant "
                         "(synthetic.CLASSIC or synthetic_clear.CLEAR)")
    config = {"source": "synthetic", "generator": variant.generator, "seed": seed, "num": num}
    if variant is not CLASSIC:
        config["variant"] = variant.name
    return write_shards(
        Path(out_dir),
        items=range(num),
        render=partial(render_samples, render_fn=variant.render, image_size=image_size, seed=seed),
        attributes=variant.attributes,
        image_size=image_size,
        source="synthetic",
        config=config,
        image_format=image_format,
        quality=quality,
        maxcount=maxcount,
        workers=workers,
        prefix=prefix,
        progress=progress,
        verify=verify,
        overwrite=overwrite,
    )
