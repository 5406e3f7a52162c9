"""``ShardSpec``: what a shard argument resolves to (URLs, per-shard counts, storage format)."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from webdataset.shardlists import expand_urls

from .codec import ATTRS_EXT, IMAGE_EXT
from .errors import DataError
from .manifest import MANIFEST_NAME, read_manifest
from .skip_stats import SkipStats
from .shard_reader import count_samples, is_local, iter_shard


@dataclass
class ShardSpec:
    """Resolved shard set. Build one with ``ShardSpec.resolve(x)`` where x is a directory holding
    ``manifest.json``, a manifest path, a brace pattern (``dir/shard-{000000..000009}.tar``), a
    single URL, or a list of paths/URLs. Lists and patterns pick up the manifest of the directory
    they live in when it lists them; otherwise format, size and attribute count are read from the
    first sample and counts are unknown until ``with_counts()``.
    """

    urls: list[str]
    image_size: int
    channels: int = 3
    image_format: str = "u8"
    num_attrs: int = 0
    counts: list[int] | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    @property
    def attributes(self) -> list[dict]:
        if self.manifest is not None:
            return self.manifest["attributes"]
        return [{"name": f"attr{i}", "kind": "continuous"} for i in range(self.num_attrs)]

    @property
    def image_bytes(self) -> int | None:
        """Exact member size for raw images (validated before shuffling), else None."""
        return self.channels * self.image_size**2 if self.image_format == "u8" else None

    @classmethod
    def resolve(cls, shards: "ShardSpec | str | os.PathLike | Sequence[str]") -> "ShardSpec":
        if isinstance(shards, ShardSpec):
            return shards
        if isinstance(shards, (str, os.PathLike)):
            p = Path(shards)
            if p.is_dir() or p.name == MANIFEST_NAME:
                return cls.from_manifest(read_manifest(p))
            urls = expand_urls(str(shards))
        else:
            urls = [str(u) for u in shards]
        if not urls:
            raise DataError(f"no shards in {shards!r}")
        manifest = _sibling_manifest(urls)
        if manifest is not None:
            by_path = {s["path"]: s for s in manifest["shards"]}
            picked = [by_path[str(Path(u).resolve())] for u in urls]
            spec = cls.from_manifest(manifest)
            spec.urls = list(urls)
            spec.counts = [s["num_samples"] for s in picked]
            return spec
        return cls._from_first_sample(urls)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ShardSpec":
        return cls(
            urls=[s["path"] for s in manifest["shards"]],
            image_size=manifest["image_size"],
            channels=manifest.get("channels", 3),
            image_format=manifest["image_format"],
            num_attrs=len(manifest["attributes"]),
            counts=[s["num_samples"] for s in manifest["shards"]],
            manifest=manifest,
        )

    @classmethod
    def _from_first_sample(cls, urls: list[str]) -> "ShardSpec":
        for url in urls:
            first = next(iter_shard(url, SkipStats(), limit=1), None)
            if first is None:
                continue
            fmt = next((f for f, ext in IMAGE_EXT.items() if ext in first), None)
            if fmt is None:
                exts = "/".join(IMAGE_EXT.values())
                raise DataError(f"{url}: sample {first['__key__']} has no image member ({exts})")
            attrs = first.get(ATTRS_EXT)
            if fmt == "u8":
                side = math.isqrt(len(first[fmt]) // 3)
                if 3 * side * side != len(first[fmt]):
                    raise DataError(
                        f"{url}: sample {first['__key__']}: raw image of {len(first[fmt])} bytes is not 3×S×S"
                    )
            else:
                with Image.open(io.BytesIO(first[fmt])) as img:  # reads the header only
                    side = img.size[0]
            return cls(urls=list(urls), image_size=side, image_format=fmt,
                       num_attrs=0 if attrs is None else len(attrs) // 4)
        raise DataError(f"no readable sample in any of {len(urls)} shards (first: {urls[0]})")

    def with_counts(self) -> "ShardSpec":
        """Counts are needed to split an evaluation pass by sample; scan shards if no manifest."""
        if self.counts is None:
            self.counts = [count_samples(u) for u in self.urls]
        return self


def _sibling_manifest(urls: list[str]) -> dict | None:
    if not all(is_local(u) for u in urls):
        return None
    dirs = {Path(u).resolve().parent for u in urls}
    if len(dirs) != 1:
        return None
    path = dirs.pop() / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    listed = {s["path"] for s in manifest["shards"]}
    return manifest if all(str(Path(u).resolve()) in listed for u in urls) else None
