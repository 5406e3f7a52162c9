"""The ``staged`` synthetic variant: 16-px images whose factors are destroyed at designed noise levels.

Made for the claim experiment (``diti_fast/claim``). DiTi predicts an order between factors that the
forward diffusion destroys at different time-steps, so this design spreads its factors over the
three stages of the claim preset ([0, 250), [250, 500), [500, 1000)) and adds two crossover factors
that pull noise level and spatial scale apart:

=============  ======================================================  =========  ==============
factor         rendering (grey levels, then rounded to uint8)           values     designed stage
=============  ======================================================  =========  ==============
background     flat colour of the 192 pixels outside the square         4          3 (late)
colour         flat colour of an 8×8 square                             4          3
position       the square fills one of the 4 quadrants                  4          3
stripes        period-2 stripes of ±40 on the background, horizontal    2          3 (crossover:
               or vertical                                                         fine scale, dies late)
mark           a 2×2 darkening of −64 in the square's upper-left or     2          2 (middle)
               lower-right corner
brightness     +0 or +3 on every pixel                                  2          1 (crossover:
                                                                                   coarse scale, dies early)
texture        one of 4 patterns of ±9 on the square's central 4×4      4          1 (early)
dot            +32 on one pixel, at one of 4 places in the square       4          1
=============  ======================================================  =========  ==============

Every factor is discrete and drawn on its own, so the data is a finite set of
4·4·4·2·2·2·4·4 = 8,192 images and the exact posterior over combinations given a noisy x_t can be
computed (:mod:`diti_fast.claim.bayes` does it, and reports where each factor is lost, against the
engine's own schedule). The palette keeps every pixel inside [0, 255] before rounding, so the
factors do not interact through clipping.

Sample ``i`` depends only on ``(seed, i)``: its factor values come from its own generator.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from .tarwrite import Sample
from .writer import write_shards

VARIANT = "staged"
GENERATOR = 3  # recorded in the manifest's config (classic: 1, clear: 2)
IMAGE_SIZE = 16

# Square colours and backgrounds are the two halves of the RGB cube's corners (even and odd
# parity): any two squares, or any two backgrounds, differ in two channels, never in one.
COLOURS = ((205, 75, 75), (75, 205, 75), (75, 75, 205), (205, 205, 205))
BACKGROUNDS = ((40, 210, 210), (210, 40, 210), (210, 210, 40), (40, 40, 40))
STRIPE_AMPLITUDE = 40.0
MARK_DEPTH = 64.0
BRIGHTNESS = 3.0
TEXTURE_AMPLITUDE = 9.0
DOT_HEIGHT = 32.0
DOT_PLACES = ((0, 3), (3, 7), (7, 4), (4, 0))      # (row, col) inside the 8×8 square, off the mark and texture

# name, number of values, class names, spatial scale, the stage the design puts it in
FACTORS = (
    ("background", 4, ["cyan", "magenta", "yellow", "black"], "coarse", 3),
    ("colour", 4, ["red", "green", "blue", "white"], "coarse", 3),
    ("position", 4, ["top-left", "top-right", "bottom-left", "bottom-right"], "coarse", 3),
    ("stripes", 2, ["horizontal", "vertical"], "fine", 3),
    ("mark", 2, ["upper-left", "lower-right"], "fine", 2),
    ("brightness", 2, ["+0", "+3"], "coarse", 1),
    ("texture", 4, ["checker", "checker-inverse", "rows", "columns"], "fine", 1),
    ("dot", 4, [f"r{r}c{c}" for r, c in DOT_PLACES], "fine", 1),
)
NAMES = [f[0] for f in FACTORS]
LEVELS = np.array([f[1] for f in FACTORS], np.int64)
NUM_COMBINATIONS = int(np.prod(LEVELS))
ATTRIBUTES = [{"name": n, "kind": "categorical", "num_classes": k, "classes": list(c), "scale": sc,
               "designed_stage": st, "group": "fine" if st == 1 else ("coarse" if st == 3 else "middle")}
              for n, k, c, sc, st in FACTORS]


def combination_values(index) -> np.ndarray:
    """Combination index (mixed radix, first factor most significant) -> factor values, int64 N×F."""
    index = np.asarray(index, np.int64).reshape(-1)
    out = np.empty((len(index), len(LEVELS)), np.int64)
    rest = index.copy()
    for j in range(len(LEVELS) - 1, -1, -1):
        out[:, j] = rest % LEVELS[j]
        rest //= LEVELS[j]
    return out


def combination_index(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.int64).reshape(-1, len(LEVELS))
    idx = np.zeros(len(values), np.int64)
    for j in range(len(LEVELS)):
        idx = idx * LEVELS[j] + values[:, j]
    return idx


def _texture(pattern: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    sign = {0: (i + j) % 2 == 0, 1: (i + j) % 2 == 1, 2: i % 2 == 0, 3: j % 2 == 0}[pattern]
    return np.where(sign, TEXTURE_AMPLITUDE, -TEXTURE_AMPLITUDE).astype(np.float32)


def render_values(values: np.ndarray) -> np.ndarray:
    """Factor values (N×F) -> float32 N×16×16×3 grey levels, before rounding."""
    v = np.asarray(values, np.int64).reshape(-1, len(LEVELS))
    n, s = len(v), IMAGE_SIZE
    col = dict(zip(NAMES, v.T))
    img = np.empty((n, s, s, 3), np.float32)
    img[:] = np.asarray(BACKGROUNDS, np.float32)[col["background"]][:, None, None, :]
    rows, cols = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    stripes = np.where(col["stripes"][:, None, None] == 0, rows % 2 == 0, cols % 2 == 0)
    r0 = (col["position"] // 2) * 8
    c0 = (col["position"] % 2) * 8
    inside = ((rows[None] >= r0[:, None, None]) & (rows[None] < r0[:, None, None] + 8)
              & (cols[None] >= c0[:, None, None]) & (cols[None] < c0[:, None, None] + 8))
    img += np.where(inside, 0.0, np.where(stripes, STRIPE_AMPLITUDE, -STRIPE_AMPLITUDE))[..., None]
    colours = np.asarray(COLOURS, np.float32)[col["colour"]]
    img = np.where(inside[..., None], colours[:, None, None, :], img)
    textures = np.stack([_texture(p) for p in range(4)])
    for k in range(n):
        r, c = int(r0[k]), int(c0[k])
        mr, mc = (0, 0) if col["mark"][k] == 0 else (6, 6)
        img[k, r + mr:r + mr + 2, c + mc:c + mc + 2] -= MARK_DEPTH
        img[k, r + 2:r + 6, c + 2:c + 6] += textures[col["texture"][k]][..., None]
        dr, dc = DOT_PLACES[col["dot"][k]]
        img[k, r + dr, c + dc] += DOT_HEIGHT
    img += np.where(col["brightness"] == 1, BRIGHTNESS, 0.0).astype(np.float32)[:, None, None, None]
    return img


def render_uint8(values: np.ndarray) -> np.ndarray:
    img = render_values(values)
    if img.min() < 0 or img.max() > 255:  # the palette is chosen so that this never happens
        raise AssertionError("staged variant: a pixel left [0, 255] before rounding")
    return np.rint(img).astype(np.uint8)


def all_images() -> np.ndarray:
    """Every combination, uint8 8192×16×16×3, in combination-index order."""
    return render_uint8(combination_values(np.arange(NUM_COMBINATIONS)))


def draw_values(seed: int, indices) -> np.ndarray:
    """Factor values of samples ``indices`` (N×F): each factor uniform, each sample its own generator."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((len(indices), len(LEVELS)), np.int64)
    for j, idx in enumerate(indices):
        rng = np.random.default_rng([seed, int(idx), GENERATOR])
        out[j] = rng.integers(0, LEVELS)
    return out


def redraw(values: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``values`` with factor number ``factor`` changed to another value, uniformly."""
    out = np.array(values, np.int64, copy=True)
    k = LEVELS[factor]
    out[:, factor] = (out[:, factor] + rng.integers(1, k, len(out))) % k
    return out


def _render_samples(indices: list, seed: int):
    values = draw_values(seed, indices)
    images = render_uint8(values)
    for i, idx in enumerate(indices):
        yield Sample(index=int(idx), image=images[i], attrs=values[i].astype(np.float32))


def make_staged_shards(out_dir: str | os.PathLike, num: int, seed: int = 0, maxcount: int = 4000,
                       workers: int = 1, progress: bool = False) -> dict:
    """Write ``num`` samples of the staged variant as shards into ``out_dir``; returns the manifest."""
    if num < 1:
        raise ValueError("num must be >= 1")
    config = {"source": "synthetic", "generator": GENERATOR, "variant": VARIANT, "seed": seed, "num": num}
    return write_shards(Path(out_dir), items=range(num), render=partial(_render_samples, seed=seed),
                        attributes=ATTRIBUTES, image_size=IMAGE_SIZE, source="synthetic", config=config,
                        maxcount=maxcount, workers=workers, progress=progress)
