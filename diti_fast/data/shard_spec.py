"""``ShardSpec``: what a shard argument resolves to (URLs, per-shard counts, image format and size,
attributes) plus how to read it (size policy, resize filter, stall limit)."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from webdataset.shardlists import expand_urls

from .codec import RESAMPLE, SIZE_POLICIES, image_member, image_side
from .errors import DataError
from .labels import AttributeScan, label_names
from .manifest import MANIFEST_NAME, is_remote, read_manifest
from .shard_reader import (DEFAULT_LIMITS, ShardRead, StreamLimits, check_url, count_samples, is_local, local_path,
                           shard_sha256)
from .skip_stats import DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipStats


@dataclass
class ShardSpec:
    """Resolved shard set. Build one with ``ShardSpec.resolve(x)`` where x is

    * a local directory holding ``manifest.json``, or a manifest path (``…/manifest.json``);
    * a manifest URL (``http(s)://host/dir/manifest.json``, or ``…/dir/`` for the manifest in it);
    * a brace pattern (``dir/shard-{000000..000009}.tar``, ``pipe:cat dir/shard-{0..9}.tar``,
      ``http://host/shard-{000000..000009}.tar``) or a list of paths/URLs.

    Local lists and patterns pick up the manifest of their directory when it lists them; otherwise
    format, size and labels come from the first sample and counts stay unknown until
    ``with_counts()`` (one streaming pass, announced on stderr).
    """

    urls: list[str]
    image_size: int
    channels: int = 3
    image_format: str = "u8"  # the image member looked for first (any READ_IMAGE_EXTS is read)
    attributes: list[dict] = field(default_factory=list)
    counts: list[int] | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    # How to read: an image of another size is resized (center crop + resample), skipped and
    # counted ("skip"), or stops the run ("error").
    size_mismatch: str = "resize"
    resample: str = "bicubic"
    max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS
    limits: StreamLimits = DEFAULT_LIMITS  # download time limits of http(s) shards
    label_member: str | None = field(default=None, repr=False)  # manifest-less sets: json, cls or f32
    sha256_checked: bool = field(default=False, repr=False)

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    @property
    def num_attrs(self) -> int:
        return len(self.attributes)

    @property
    def image_bytes(self) -> int:
        """Exact member size of a raw image at the target size."""
        return self.channels * self.image_size**2

    def reading(self, *, image_size: int | None = None, size_mismatch: str | None = None,
                resample: str | None = None, max_consecutive_skips: int | None = None,
                limits: StreamLimits | None = None) -> "ShardSpec":
        """A copy with reading options set (None keeps the current value)."""
        if size_mismatch is not None and size_mismatch not in SIZE_POLICIES:
            raise ValueError(f"size_mismatch must be one of {SIZE_POLICIES}, got {size_mismatch!r}")
        if resample is not None and resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        changes = {k: v for k, v in dict(image_size=image_size, size_mismatch=size_mismatch, resample=resample,
                                         max_consecutive_skips=max_consecutive_skips, limits=limits).items()
                   if v is not None}
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, shards: "ShardSpec | str | os.PathLike | Sequence[str]",
                limits: StreamLimits = DEFAULT_LIMITS) -> "ShardSpec":
        """``limits``: for the downloads resolving needs (a remote manifest, a first sample) and
        kept for every later read."""
        if isinstance(shards, ShardSpec):
            return shards
        spec = cls._resolve(shards, limits)
        spec.limits = limits
        return spec

    @classmethod
    def _resolve(cls, shards, limits: StreamLimits) -> "ShardSpec":
        if isinstance(shards, os.PathLike):
            shards = str(shards)
        if isinstance(shards, str):
            if is_remote(shards):
                if shards.endswith((".json", "/")) and not shards.startswith("pipe:"):
                    url = shards + MANIFEST_NAME if shards.endswith("/") else shards
                    check_url(url)
                    return cls.from_manifest(read_manifest(url, limits))
            else:
                p = Path(local_path(shards))
                if p.is_dir() or p.suffix == ".json":
                    return cls.from_manifest(read_manifest(p))
                if "{" not in shards and not p.exists():
                    raise FileNotFoundError(f"{p}: not found (expected a directory holding {MANIFEST_NAME}, "
                                            "a manifest, a shard, a brace pattern or a list of them)")
            urls = expand_urls(shards)
        else:
            urls = [str(u) for u in shards]
        if not urls:
            raise DataError(f"no shards in {shards!r}")
        for url in urls:
            check_url(url)
        manifest = _sibling_manifest(urls)
        if manifest is not None:
            by_path = {s["path"]: s for s in manifest["shards"]}
            picked = [by_path[str(Path(local_path(u)).resolve())] for u in urls]
            spec = cls.from_manifest(manifest)
            spec.urls = list(urls)
            spec.counts = [s["num_samples"] for s in picked]
            return spec
        return cls._from_first_sample(urls, limits)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ShardSpec":
        return cls(
            urls=[s["path"] for s in manifest["shards"]],
            image_size=manifest["image_size"],
            channels=manifest.get("channels", 3),
            image_format=manifest["image_format"],
            attributes=list(manifest["attributes"]),
            counts=[s["num_samples"] for s in manifest["shards"]],
            manifest=manifest,
        )

    @classmethod
    def _from_first_sample(cls, urls: list[str], limits: StreamLimits) -> "ShardSpec":
        url = urls[0]
        stats = SkipStats()
        first = next(iter(ShardRead(url, stats, limit=1, limits=limits)), None)
        if first is None:
            why = stats.examples[0] if stats.examples else f"{url}: no samples"
            raise DataError(f"cannot read the first shard of the set: {why}")
        ext = image_member(first)
        if ext is None:
            present = sorted(k for k in first if not k.startswith("__"))
            raise DataError(f"{url}: sample {first['__key__']} has no image member "
                            f"(jpg/jpeg/png/webp/ppm/u8; has {present})")
        side = image_side(first[ext], ext)
        if side is None:
            raise DataError(f"{url}: sample {first['__key__']}: the .{ext} image cannot be read")
        member, names = label_names(first)
        return cls(urls=list(urls), image_size=side, image_format=ext, label_member=member,
                   attributes=[{"name": n, "kind": "continuous"} for n in names])

    def with_counts(self) -> "ShardSpec":
        """Counts are needed to split an evaluation pass and to size an epoch; without a manifest
        this is one pass over the set (tar headers only for local plain tars), which also gives
        json/cls labels their kinds and class counts."""
        if self.counts is not None:
            return self
        member = self.label_member
        scan = AttributeScan(member, [a["name"] for a in self.attributes]) if member in ("json", "cls") else None
        print(f"[diti-fast data] no manifest for {len(self.urls)} shard(s) ({self.urls[0]}"
              f"{', …' if len(self.urls) > 1 else ''}): counting samples"
              f"{' and reading label values' if scan else ''} in one pass", file=sys.stderr, flush=True)
        self.counts = [count_samples(u, scan.add if scan else None, self.limits) for u in self.urls]
        if scan is not None:
            self.attributes = scan.attributes()
        return self

    def verify_sha256(self) -> None:
        """Hash every shard (one full read) against the manifest; a mismatch is an error naming it."""
        if self.sha256_checked:
            return
        if self.manifest is None:
            raise DataError(f"data.verify needs a manifest with sha256 sums; {self.urls[0]} has none")
        by_path = {s["path"]: s for s in self.manifest["shards"]}
        for url in self.urls:
            entry = by_path.get(url) or by_path.get(str(Path(local_path(url)).resolve()))
            if entry is None:
                continue
            try:
                digest = shard_sha256(url, self.limits)
            except OSError as exc:
                raise DataError(f"{url}: cannot read shard to verify it ({exc})") from None
            if digest != entry["sha256"]:
                raise DataError(f"{url}: sha256 {digest[:16]}… does not match the manifest's "
                                f"{entry['sha256'][:16]}… (shard {entry['name']}); refusing to read it "
                                "(data.verify=true)")
        self.sha256_checked = True


def _sibling_manifest(urls: list[str]) -> dict | None:
    if not all(is_local(u) for u in urls):
        return None
    dirs = {Path(local_path(u)).resolve().parent for u in urls}
    if len(dirs) != 1:
        return None
    path = dirs.pop() / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    listed = {s["path"] for s in manifest["shards"]}
    return manifest if all(str(Path(local_path(u)).resolve()) in listed for u in urls) else None
