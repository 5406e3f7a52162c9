"""The ``clear`` variant of the synthetic dataset: every fine factor visible, every factor independent.

Made for the claim run (``diti_fast/claim.py``) after the demo found the classic variant's fine
factors at chance everywhere. Differences from :mod:`data_shards.synthetic` (the classic variant,
which stays as it was for the demo and the tests):

* contrast: stripes at ±24 grey levels (±0.19 in model units; the classic ±12 is hard to see) on a
  mid-grey background (64) and a palette kept inside [64, 192], so stripes never clip;
* frequency: periods 3 / 4 / 5.5 px (the classic 2.5 px is near the Nyquist limit at 45°, where it
  aliases into a coarser pattern);
* speckle: salt-and-pepper dots (a pixel set to black or white), visible on any colour; density
  uniform in [0, 0.06);
* phase: categorical (4 quarter-period shifts) instead of a continuous angle, which a linear probe
  cannot read as one number (0 and 2π are the same image);
* independence: position is uniform on a range fixed for every size (the classic variant draws the
  centre inside [r, 1 − r], so the spread of the position depends on the size); every factor is
  drawn on its own from the sample's generator.

Coarse factors survive heavy diffusion noise and fine ones do not — :func:`factor_deltas` measures it:
for each factor, the L2 norm (model units) of the image change when only that factor is redrawn.
The claim module turns these norms into the time-step where a Bayes-optimal detector loses the factor.

Sample ``i`` depends only on ``(seed, i, image_size)``, like the classic variant.
"""

from __future__ import annotations

import numpy as np

from . import synthetic as classic
from .synthetic import SHAPES

VARIANT = "clear"
GENERATOR = 2  # recorded in the manifest's config (the classic variant is generator 1)

# Palette inside [64, 192] so that ±24 stripes never clip (independent factors stay independent in pixels).
COLOURS = {
    "red": (192, 64, 64),
    "green": (64, 184, 72),
    "blue": (72, 96, 192),
    "yellow": (192, 184, 64),
    "magenta": (184, 72, 184),
    "cyan": (64, 184, 192),
}
BACKGROUND = (64, 64, 64)
STRIPE_PERIODS = (3.0, 4.0, 5.5)          # pixels
STRIPE_ORIENTATIONS = (0, 45, 90, 135)    # degrees; 0 = intensity varies along x
STRIPE_PHASES = (0, 90, 180, 270)         # degrees of the stripe period
STRIPE_AMPLITUDE = 24.0                   # grey levels
SPECKLE_MAX = 0.06                        # density of salt-and-pepper pixels
SIZE_RANGE = (0.16, 0.28)                 # half-extent / side
POS_RANGE = (0.31, 0.69)                  # centre / side, the same for every size: max size still in frame

def _attributes() -> list[dict]:
    """The classic variant's factors, names and fine/coarse tags, with this variant's period classes and
    a categorical phase."""
    out = []
    for a in classic.ATTRIBUTES:
        a = dict(a)
        if a["name"] == "stripe_period":
            a["classes"] = [f"{p:g}px" for p in STRIPE_PERIODS]
        elif a["name"] == "stripe_phase":
            a.update(kind="categorical", num_classes=len(STRIPE_PHASES), classes=[f"{p}deg" for p in STRIPE_PHASES])
        out.append(a)
    return out


ATTRIBUTES = _attributes()
ATTRIBUTE_NAMES = [a["name"] for a in ATTRIBUTES]
_PIXELS_PER_CHUNK = 1 << 19


def draw_factors(seed: int, indices: np.ndarray, size: int) -> dict:
    """Per-sample factors plus the two uniform fields the speckle is cut from (so that changing the
    density alone changes only which pixels are hit)."""
    n = len(indices)
    f = {k: np.empty(n, np.float64) for k in ATTRIBUTE_NAMES}
    f["_u"] = np.empty((n, size, size), np.float32)
    f["_salt"] = np.empty((n, size, size), bool)
    for j, idx in enumerate(indices):
        rng = np.random.default_rng([seed, int(idx), GENERATOR])
        f["shape"][j] = rng.integers(len(SHAPES))
        f["colour"][j] = rng.integers(len(COLOURS))
        f["size"][j] = rng.uniform(*SIZE_RANGE)
        f["pos_x"][j] = rng.uniform(*POS_RANGE)
        f["pos_y"][j] = rng.uniform(*POS_RANGE)
        f["stripe_period"][j] = rng.integers(len(STRIPE_PERIODS))
        f["stripe_orientation"][j] = rng.integers(len(STRIPE_ORIENTATIONS))
        f["stripe_phase"][j] = rng.integers(len(STRIPE_PHASES))
        f["speckle"][j] = rng.uniform(0.0, SPECKLE_MAX)
        f["_u"][j] = rng.random((size, size))
        f["_salt"][j] = rng.random((size, size)) < 0.5
    return f


def redraw(f: dict, name: str, rng: np.random.Generator) -> dict:
    """A copy of ``f`` with factor ``name`` redrawn to a different value for every sample."""
    g = {k: v.copy() for k, v in f.items()}
    n = len(f["shape"])
    levels = {"shape": len(SHAPES), "colour": len(COLOURS), "stripe_period": len(STRIPE_PERIODS),
              "stripe_orientation": len(STRIPE_ORIENTATIONS), "stripe_phase": len(STRIPE_PHASES)}
    if name in levels:
        g[name] = (f[name] + rng.integers(1, levels[name], n)) % levels[name]
    else:
        lo, hi = {"pos_x": POS_RANGE, "pos_y": POS_RANGE, "size": SIZE_RANGE, "speckle": (0.0, SPECKLE_MAX)}[name]
        g[name] = rng.uniform(lo, hi, n)
    return g


def render_factors(f: dict, size: int) -> np.ndarray:
    """Images as float32 N×S×S×3 grey levels (unrounded) from explicit factors."""
    s = int(size)
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s
    dx = coords[None, None, :] - f["pos_x"].astype(np.float32)[:, None, None]
    dy = coords[None, :, None] - f["pos_y"].astype(np.float32)[:, None, None]
    r = f["size"].astype(np.float32)[:, None, None]
    # The three shapes share the bounding box [c-r, c+r]²: shape alone sets the fill ratio.
    circle = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    triangle = (dy <= r) & (2 * np.abs(dx) <= dy + r)
    shape = f["shape"].astype(np.int64)[:, None, None]
    mask = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
    colour = np.array(list(COLOURS.values()), np.float32)[f["colour"].astype(np.int64)]
    img = np.where(mask[..., None], colour[:, None, None, :], np.array(BACKGROUND, np.float32))
    theta = np.deg2rad(np.array(STRIPE_ORIENTATIONS, np.float32)[f["stripe_orientation"].astype(np.int64)])
    period = np.array(STRIPE_PERIODS, np.float32)[f["stripe_period"].astype(np.int64)]
    phase = np.deg2rad(np.array(STRIPE_PHASES, np.float32)[f["stripe_phase"].astype(np.int64)])
    px = coords * s
    u = px[None, None, :] * np.cos(theta)[:, None, None] + px[None, :, None] * np.sin(theta)[:, None, None]
    img = img + (STRIPE_AMPLITUDE * np.cos(2 * np.pi * u / period[:, None, None] + phase[:, None, None]))[..., None]
    hit = f["_u"] < f["speckle"].astype(np.float32)[:, None, None]
    dots = np.where(f["_salt"], 255.0, 0.0).astype(np.float32)
    return np.where(hit[..., None], dots[..., None], img)


def render(indices, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 N×S×S×3) and attributes (float32 N×A, ``ATTRIBUTES`` order) for ``indices``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    s = int(image_size)
    if s < 16:
        raise ValueError("the clear variant needs image_size >= 16 (its stripe periods are up to 5.5 px)")
    images = np.empty((len(indices), s, s, 3), np.uint8)
    attrs = np.empty((len(indices), len(ATTRIBUTES)), np.float32)
    step = max(1, _PIXELS_PER_CHUNK // (s * s))
    for a in range(0, len(indices), step):
        f = draw_factors(seed, indices[a:a + step], s)
        images[a:a + step] = np.clip(np.rint(render_factors(f, s)), 0, 255).astype(np.uint8)
        attrs[a:a + step] = np.stack([f[k] for k in ATTRIBUTE_NAMES], axis=1)
    return images, attrs


def factor_deltas(num: int = 256, image_size: int = 32, seed: int = 12345) -> dict[str, np.ndarray]:
    """Per factor: the L2 norm, in model units ([-1, 1]: grey / 127.5), of the image change when that
    factor alone is redrawn to another value, over ``num`` random samples (float64 array each)."""
    f = draw_factors(seed, np.arange(num), image_size)
    base = render_factors(f, image_size) / 127.5
    rng = np.random.default_rng(seed)
    out = {}
    for name in ATTRIBUTE_NAMES:
        other = render_factors(redraw(f, name, rng), image_size) / 127.5
        out[name] = np.sqrt(((other - base).astype(np.float64) ** 2).reshape(num, -1).sum(1))
    return out


CLEAR = classic.Variant(VARIANT, GENERATOR, render, ATTRIBUTES)
