"""The manifest that describes one shard set: written by ``data_shards``, read by the loader.

Schema (JSON, one object)::

    format        "diti-fast-shards" (lets the writer recognise its own output directories)
    version       1
    num_samples   total samples in all shards
    image_size    side of the square images, pixels
    channels      3
    image_format  "u8" (raw uint8, CHW), "png" or "jpg"
    attributes    [{name, kind: binary|categorical|continuous, num_classes?, classes?, group?}]
    shards        [{name, num_samples, sha256, bytes}]  (names relative to the manifest)
    source, split, params, fingerprint  (provenance; used for idempotent re-runs)

A manifest may be read from a local path or a URL (``http(s)://…/manifest.json``, ``pipe:…``);
shard names resolve relative to its location and must stay inside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from ..files import write_text_atomic
from .errors import DataError, DataFormatError

MANIFEST_NAME = "manifest.json"
FORMAT_TAG = "diti-fast-shards"
FORMAT_VERSION = 1
ATTRIBUTE_KINDS = ("binary", "categorical", "continuous")
IMAGE_FORMATS = ("u8", "png", "jpg")


def manifest_path(dir_or_file: str | os.PathLike) -> Path:
    p = Path(dir_or_file)
    return p / MANIFEST_NAME if p.is_dir() else p


def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or urlparse(location).scheme not in ("", "file")


def read_manifest(location: str | os.PathLike, limits=None) -> dict[str, Any]:
    """Load and validate a manifest (a directory holding one, its path, or a URL);
    ``shards[i]["path"]`` is added: an absolute path, or a URL beside the manifest's. ``limits``:
    the download's time limits (``shard_reader.StreamLimits``; default: its defaults)."""
    if isinstance(location, str) and is_remote(location):
        return _read_remote(location, limits)
    if isinstance(location, str) and location.startswith("file:"):
        location = location[len("file://"):] if location.startswith("file://") else location[len("file:"):]
    path = manifest_path(location)
    if not path.is_file():
        hint = ""
        parent = Path(location)
        if parent.is_dir():
            subsets = sorted(d.name for d in parent.iterdir() if (d / MANIFEST_NAME).is_file())
            if subsets:
                hint = f"; it holds shard sets {', '.join(subsets)} (pass one of those directories)"
        raise FileNotFoundError(f"{path}: no shard manifest{hint}")
    manifest = _parse(path.read_bytes(), path)
    for shard in manifest["shards"]:
        shard["path"] = str((path.parent / shard["name"]).resolve())
    return manifest


def _read_remote(url: str, limits=None) -> dict[str, Any]:
    from .shard_reader import DEFAULT_LIMITS, exit_reason, open_shard  # lazy: webdataset; the writer needs none

    if url.startswith("pipe:"):
        raise DataError(f"{url}: a manifest read through pipe: has no location for its shard names; "
                        "list the shards themselves (e.g. 'pipe:cat dir/shard-{000000..000009}.tar')")
    stream = open_shard(url, limits or DEFAULT_LIMITS)
    try:
        data = stream.read()
    except OSError:
        data = None
    try:
        stream.close()
    except OSError:
        pass
    failed = exit_reason(url, stream)
    if failed is not None or data is None:
        raise DataError(f"{url}: cannot read the shard manifest: {failed or 'read failed'}")
    manifest = _parse(data, url)
    base = url[: url.rfind("/") + 1]
    for shard in manifest["shards"]:
        shard["path"] = base + shard["name"]
    return manifest


def _parse(data: bytes, where) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataFormatError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{where}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    validate_manifest(manifest, where)
    return manifest


def check_shard_name(name: Any, where) -> None:
    """A shard name stays inside the manifest's location: a relative path without '..' segments,
    no absolute path, no URL scheme and no ``pipe:`` command: no ':' at all (a manifest must not point
    readers elsewhere, nor make them run anything)."""
    if not isinstance(name, str) or not name:
        raise DataFormatError(f"{where}: shard name {name!r} is not a non-empty string")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (name.startswith(("/", "\\")) or ".." in parts or ":" in name or "~" == name[:1]
            or (len(name) > 1 and name[1] == ":")):
        raise DataFormatError(f"{where}: shard name {name!r} leaves the manifest's location "
                              "(names must be relative, without '..', absolute paths or schemes)")


def validate_manifest(manifest: Any, where: str | os.PathLike = "manifest") -> None:
    def fail(msg: str) -> None:
        raise DataFormatError(f"{where}: {msg}")

    if not isinstance(manifest, dict):
        fail("top level is not an object")
    if manifest.get("format") != FORMAT_TAG:
        fail(f"format is {manifest.get('format')!r}, expected {FORMAT_TAG!r}")
    if manifest.get("version") != FORMAT_VERSION:
        fail(f"unsupported version {manifest.get('version')!r}")
    for key in ("num_samples", "image_size", "channels", "image_format", "attributes", "shards"):
        if key not in manifest:
            fail(f"missing key {key!r}")
    if manifest["image_format"] not in IMAGE_FORMATS:
        fail(f"image_format {manifest['image_format']!r} not one of {IMAGE_FORMATS}")
    for i, attr in enumerate(manifest["attributes"]):
        if not isinstance(attr, dict) or "name" not in attr or attr.get("kind") not in ATTRIBUTE_KINDS:
            fail(f"attributes[{i}] needs a name and a kind in {ATTRIBUTE_KINDS}: {attr!r}")
        if attr["kind"] == "categorical" and not isinstance(attr.get("num_classes"), int):
            fail(f"attributes[{i}] ({attr['name']}) is categorical but has no integer num_classes")
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        for key in ("name", "num_samples", "sha256"):
            if key not in shard:
                fail(f"shards[{i}] missing key {key!r}")
        check_shard_name(shard["name"], f"{where}: shards[{i}]")
        total += shard["num_samples"]
    if total != manifest["num_samples"]:
        fail(f"shard sample counts add up to {total}, but num_samples is {manifest['num_samples']}")


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomic write: a crash never leaves a half-written manifest that looks complete."""
    validate_manifest(manifest, "manifest to write")
    path = Path(out_dir) / MANIFEST_NAME
    clean = dict(manifest)
    clean["shards"] = [{k: v for k, v in s.items() if k != "path"} for s in manifest["shards"]]
    return write_text_atomic(path, json.dumps(clean, indent=1, sort_keys=False) + "\n")
