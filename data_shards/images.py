"""Source-image preprocessing shared by the folder and CelebA sources: load, crop, resize."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from diti_fast.data.codec import RESAMPLE  # one filter table for the writer and the loader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


def load_rgb(path) -> Image.Image:
    """Fully decoded RGB image (EXIF orientation applied); raises on unreadable files."""
    with Image.open(path) as img:
        img.load()  # force the decode here, so truncated files fail inside the caller's try
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def resize_square(img: Image.Image, size: int, resample: str) -> np.ndarray:
    """H×W×3 uint8 at ``size``×``size`` (PIL's own antialiased resize)."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE[resample])
    return np.asarray(img, dtype=np.uint8)


def resize_then_center_crop(img: Image.Image, size: int, resample: str, ratio: float = 1.1) -> np.ndarray:
    """torchvision's Resize(int(size * ratio)) then CenterCrop(size), the original's regression
    preprocessing (64 px: shorter side to 70, then the central 64x64): the shorter side goes to
    int(size * ratio) keeping the aspect (the longer one truncated as torchvision does), and the crop
    offset is round((side - size) / 2)."""
    short = int(size * ratio)
    w, h = img.size
    if w <= h:
        new = (short, int(short * h / w))
    else:
        new = (int(short * w / h), short)
    if img.size != new:
        img = img.resize(new, RESAMPLE[resample])
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
