"""Write one shard: a plain tar whose bytes depend only on its samples.

Every header field that would otherwise vary between runs (mtime, owner, permissions) is fixed,
so re-making a shard gives the same sha256; that is what lets a re-run trust what it finds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diti_fast.data.codec import (ATTRS_EXT, CLS_EXT, IMAGE_EXT, JSON_EXT, SOURCE_EXT, encode_attrs, encode_image,
                                  sample_key)

# Beside .f32, the ecosystem's label members, so other WebDataset tools read labels without our
# manifest: .cls for a single categorical attribute, else .json with every attribute by name.
LABEL_LAYOUT = "f32+cls|json"

FIXED_MTIME = 946684800  # 2000-01-01: a constant, so archives are reproducible


@dataclass
class Sample:
    index: int
    image: np.ndarray  # uint8 H×W×3 at the training resolution
    attrs: np.ndarray | None  # float32 [A], manifest order
    src: str | None = None  # relative source path, stored for traceability


@dataclass
class Skipped:
    index: int
    src: str | None
    reason: str


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def label_members(attrs: np.ndarray, attributes: list[dict]) -> tuple[str, bytes]:
    """(.cls or .json, bytes) for one sample's attribute vector."""
    if len(attributes) == 1 and attributes[0]["kind"] == "categorical":
        return CLS_EXT, str(int(attrs[0])).encode("ascii")
    obj = {}
    for a, v in zip(attributes, attrs.tolist()):
        if a["kind"] == "continuous":
            obj[a["name"]] = v
        elif a.get("classes"):
            obj[a["name"]] = a["classes"][int(v)]  # string classes as the strings, as a CSV had them
        else:
            obj[a["name"]] = int(v)
    return JSON_EXT, json.dumps(obj, separators=(",", ":")).encode("utf-8")


def write_tar(path: Path, samples, image_format: str, quality: int, attributes: list[dict]):
    """Write ``samples`` (Sample or Skipped items) to ``path`` atomically.

    Returns (num_written, skipped list, sha256 hex, byte size).
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    written, skipped = 0, []
    ext = IMAGE_EXT[image_format]
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for s in samples:
                    if isinstance(s, Skipped):
                        skipped.append(s)
                        continue
                    key = sample_key(s.index)
                    _add(tar, f"{key}.{ext}", encode_image(s.image, image_format, quality))
                    if attributes:
                        if s.attrs is None or len(s.attrs) != len(attributes):
                            raise ValueError(f"sample {s.index}: expected {len(attributes)} attributes")
                        _add(tar, f"{key}.{ATTRS_EXT}", encode_attrs(s.attrs))
                        label_ext, data = label_members(np.asarray(s.attrs, np.float32), attributes)
                        _add(tar, f"{key}.{label_ext}", data)
                    if s.src is not None:
                        _add(tar, f"{key}.{SOURCE_EXT}", s.src.encode("utf-8"))
                    written += 1
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written, skipped, digest, size


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
