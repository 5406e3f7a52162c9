"""Per-sample storage codec: how one image and its labels are stored in tar members.

Written by ``data_shards``: the image either raw (``u8``: uint8, channel-major CHW, exactly C*S*S
bytes, no header) or PNG/JPEG, plus the attributes as ``.f32`` and, for other tools, ``.cls`` (one
categorical attribute) or ``.json`` (all attributes by name). Raw is the default because the loader
then does no decoding at all: a sample is a memcpy into the batch tensor, so CPU workers never bound
GPU throughput. PNG (lossless, about half the bytes for photos) and JPEG (lossy, ~5-10x smaller) are
for sets where disk or network bandwidth is the scarcer resource (e.g. LSUN at 256 px).

Read by the loader: any of the image members in ``READ_IMAGE_EXTS`` (the WebDataset ecosystem's
usual keys), labels from ``.f32``, ``.json`` or ``.cls`` (``labels.py``).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# Tar member suffixes; the sample key is the zero-padded global index (no dots allowed in it).
IMAGE_EXT = {"u8": "u8", "png": "png", "jpg": "jpg"}  # what data_shards writes, per --format
ATTRS_EXT = "f32"  # little-endian float32 vector in manifest attribute order
CLS_EXT = "cls"  # the ecosystem's class label: one integer as text
JSON_EXT = "json"  # the ecosystem's metadata: {"attribute name": value, ...}
SOURCE_EXT = "src"  # utf-8 relative path of the source image, for traceability
KEY_DIGITS = 9
# Image members the loader reads, in the order it looks for them (u8 first: no decoding at all).
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "ppm": "PPM"}
READ_IMAGE_EXTS = ("u8",) + tuple(_PIL_FORMAT)
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
SIZE_POLICIES = ("resize", "skip", "error")


class DecodeError(ValueError):
    """The bytes of one image member cannot be turned into an image."""


class SizeError(ValueError):
    """The image decoded but has another size, and the size policy does not resize."""


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def key_index(key: str) -> int:
    """Global sample index from a key written by data_shards; -1 for foreign keys."""
    base = key.rsplit("/", 1)[-1]
    return int(base) if base.isdigit() else -1


def image_member(sample: dict, preferred: str | None = None) -> str | None:
    """The suffix of the sample's image member (the spec's own format first), or None."""
    if preferred is not None and preferred in sample:
        return preferred
    return next((ext for ext in READ_IMAGE_EXTS if ext in sample), None)


def encode_image(hwc: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {hwc.dtype} {hwc.shape}")
    if fmt == "u8":
        return np.ascontiguousarray(hwc.transpose(2, 0, 1)).tobytes()
    buf = io.BytesIO()
    img = Image.fromarray(hwc, "RGB")
    if fmt == "png":
        # compress_level 1: decode speed is the same at every level, and writing is much faster.
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def raw_side(nbytes: int, channels: int = 3) -> int | None:
    """Side of a raw square C×S×S image of ``nbytes`` bytes, or None if no square fits."""
    side = math.isqrt(nbytes // channels)
    return side if side and channels * side * side == nbytes else None


def center_square_resize(img: Image.Image, size: int, resample: str) -> np.ndarray:
    """H×W×3 uint8: the central square of ``img`` resized to ``size`` (PIL's antialiased resize)."""
    w, h = img.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), RESAMPLE[resample])
    return np.asarray(img, dtype=np.uint8)


def decode_image_into(out: np.ndarray, data: bytes, fmt: str, flip: bool = False,
                      size_policy: str = "error", resample: str = "bicubic") -> None:
    """Decode into ``out`` (uint8 C×S×S view of the batch buffer), optionally mirrored.

    An image of another size is center-cropped and resized when ``size_policy`` is "resize";
    otherwise it raises SizeError (the caller skips or stops, as configured)."""
    c, h, w = out.shape
    hwc = None
    if fmt == "u8":
        if len(data) == c * h * w:
            chw = np.frombuffer(data, np.uint8).reshape(c, h, w)
        else:
            side = raw_side(len(data), c)
            if side is None:
                raise DecodeError(f"raw image has {len(data)} bytes, not {c}×S×S for any S")
            if size_policy != "resize":
                raise SizeError(f"raw image is {side}x{side}, expected {w}x{h}")
            chw = np.frombuffer(data, np.uint8).reshape(c, side, side)
            hwc = center_square_resize(Image.fromarray(chw.transpose(1, 2, 0)), h, resample)
    else:
        try:
            # Naming the format keeps PIL from probing (and importing) every plugin on bad data.
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as img:
                img = img.convert("RGB")  # grey, palette, RGBA, CMYK: all become RGB here
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # PIL's errors for truncated or garbled data (UnidentifiedImageError is an OSError).
            raise DecodeError(f"cannot decode {fmt}: {type(exc).__name__}: {exc}") from None
        if img.size != (w, h):
            if size_policy != "resize":
                raise SizeError(f"image is {img.size[0]}x{img.size[1]}, expected {w}x{h}")
            hwc = center_square_resize(img, h, resample)
        else:
            hwc = np.asarray(img)
    if hwc is not None:
        chw = hwc.transpose(2, 0, 1)
    out[...] = chw[:, :, ::-1] if flip else chw


def decode_image(data: bytes, fmt: str, size: int, channels: int = 3, size_policy: str = "error",
                 resample: str = "bicubic") -> np.ndarray:
    out = np.empty((channels, size, size), np.uint8)
    decode_image_into(out, data, fmt, size_policy=size_policy, resample=resample)
    return out


def image_side(data: bytes, fmt: str, channels: int = 3) -> int | None:
    """Side (the shorter one) of an image member without decoding pixels; None if unreadable."""
    if fmt == "u8":
        return raw_side(len(data), channels)
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as img:  # reads the header only
            return min(img.size)
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def encode_attrs(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()
