"""Per-sample storage codec: how one image and its attribute vector are stored in a tar member.

Images are stored either raw (``u8``: uint8, channel-major CHW, exactly C*S*S bytes, no header)
or PNG/JPEG. Raw is the default because the loader then does no decoding at all: a sample is a
memcpy into the batch tensor, so CPU workers never bound GPU throughput. PNG (lossless, about
half the bytes for photos) and JPEG (lossy, ~5-10x smaller) are for sets where disk or network
bandwidth is the scarcer resource (e.g. LSUN at 256 px).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Tar member suffixes; the sample key is the zero-padded global index (no dots allowed in it).
IMAGE_EXT = {"u8": "u8", "png": "png", "jpg": "jpg"}
ATTRS_EXT = "f32"  # little-endian float32 vector in manifest attribute order
SOURCE_EXT = "src"  # utf-8 relative path of the source image, for traceability
KEY_DIGITS = 9
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


class DecodeError(ValueError):
    """The bytes of one image member cannot be turned into the expected C×S×S array."""


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def key_index(key: str) -> int:
    """Global sample index from a key written by data_shards; -1 for foreign keys."""
    base = key.rsplit("/", 1)[-1]
    return int(base) if base.isdigit() else -1


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


def decode_image_into(out: np.ndarray, data: bytes, fmt: str, flip: bool = False) -> None:
    """Decode into ``out`` (uint8 C×S×S view of the batch buffer), optionally mirrored."""
    c, h, w = out.shape
    if fmt == "u8":
        if len(data) != c * h * w:
            raise DecodeError(f"raw image has {len(data)} bytes, expected {c}*{h}*{w}={c * h * w}")
        chw = np.frombuffer(data, np.uint8).reshape(c, h, w)
    else:
        try:
            # Naming the format keeps PIL from probing (and importing) every plugin on bad data.
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as img:
                img = img.convert("RGB")
                hwc = np.asarray(img)
        except Exception as exc:  # PIL raises many types for truncated or garbled data
            raise DecodeError(f"cannot decode {fmt}: {exc}") from None
        if hwc.shape != (h, w, c):
            raise DecodeError(f"decoded image is {hwc.shape[1]}x{hwc.shape[0]}, expected {w}x{h}")
        chw = hwc.transpose(2, 0, 1)
    out[...] = chw[:, :, ::-1] if flip else chw


def decode_image(data: bytes, fmt: str, size: int, channels: int = 3) -> np.ndarray:
    out = np.empty((channels, size, size), np.uint8)
    decode_image_into(out, data, fmt)
    return out


def encode_attrs(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()
