"""Labelled image grids saved as PNG (PIL only: no figure machinery for what is a paste of tiles).

Layout, in pixels (``cell = scale * image side``)::

    width  = label_width + cols * cell + (cols + 1) * pad
    height = title_height + header_height + rows * cell + (rows + 1) * pad

Row labels sit in the left column, column labels in the header band, the title above it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_LINE_H = 13  # one line of 11 pt label text


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space images [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3] (the original's rounding)."""
    x = x.detach().float().cpu()
    x = (x * 0.5 + 0.5).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


@functools.lru_cache(maxsize=1)
def _font():
    """DejaVu Sans (shipped with matplotlib) has α and arrows; PIL's own default font does not."""
    try:
        from matplotlib import font_manager  # lazy: matplotlib is slow to import; used once, for the font file
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), 11)
    except Exception:  # no matplotlib or no FreeType: plain labels still work
        return ImageFont.load_default()


def _text_width(lines: list[str]) -> int:
    font = _font()
    return int(max((font.getlength(s) for s in lines), default=0)) + 1


def grid_size(rows: int, cols: int, side: int, scale: int = 1, pad: int = 2, label_width: int = 0,
              header_height: int = 0, title_height: int = 0) -> tuple[int, int]:
    cell = side * scale
    return (label_width + cols * cell + (cols + 1) * pad,
            title_height + header_height + rows * cell + (rows + 1) * pad)


def image_grid(images: torch.Tensor | np.ndarray, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, title: str | None = None, scale: int | None = None,
               pad: int = 2, label_width: int | None = None, header_height: int | None = None,
               title_height: int | None = None) -> Image.Image:
    """``images``: [R, C, 3, H, W] in [-1, 1] (tensor) or uint8 [R, C, H, W, 3]. Small images are scaled
    up by an integer factor (nearest, so pixels stay pixels) to at least 64 px per cell."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.uint8)
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise ValueError(f"expected images [rows, cols, 3, H, W] or [rows, cols, H, W, 3], got {arr.shape}")
    R, C, H, W = arr.shape[:4]
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"{len(row_labels)} row labels for {R} rows")
    if col_labels is not None and len(col_labels) != C:
        raise ValueError(f"{len(col_labels)} column labels for {C} columns")
    scale = scale if scale is not None else max(1, -(-64 // max(H, W)))
    if label_width is None:
        label_width = _text_width(row_labels or []) + 2 * pad if row_labels else 0
    if header_height is None:
        header_height = _LINE_H + 2 * pad if col_labels else 0
    if title_height is None:
        title_height = _LINE_H + 2 * pad if title else 0
    size = grid_size(R, C, max(H, W), scale, pad, label_width, header_height, title_height)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font()
    cell = max(H, W) * scale
    top = title_height + header_height + pad
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for c in range(C):
        x = label_width + pad + c * (cell + pad)
        if col_labels:
            draw.text((x, title_height + pad), col_labels[c], fill=(0, 0, 0), font=font)
        for r in range(R):
            tile = Image.fromarray(arr[r, c]).resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(tile, (x, top + r * (cell + pad)))
    if row_labels:
        for r in range(R):
            draw.text((pad, top + r * (cell + pad) + cell // 2 - _LINE_H // 2), row_labels[r], fill=(0, 0, 0),
                      font=font)
    return canvas


def save_grid(path: str | Path, images, row_labels=None, col_labels=None, title=None, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, row_labels, col_labels, title, **kw).save(path, format="PNG")
    return path
