"""Reading one shard as a stream of samples, on webdataset's tar iterators.

A sample is webdataset's dict: ``__key__``, ``__url__`` and one bytes value per member suffix.
Nothing here decodes images: skipping (resume, split boundaries) costs only tar reading.
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Iterator
from urllib.parse import urlparse

from webdataset import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .codec import ATTRS_EXT, IMAGE_EXT
from .errors import CorruptSampleError
from .skip_stats import SkipStats
from .tar_members import BLOCK, TarFormatError, iter_members, looks_compressed, seek_to_sample

_LOCAL_BUFFER = 1 << 20  # fewer syscalls than the 8 KiB default when streaming local tars


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def open_shard(url: str):
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return open(path, "rb", buffering=_LOCAL_BUFFER)
    return gopen.gopen(url, "rb")  # pipe:, http(s):, s3/gs via their CLIs, ...


def iter_shard(url: str, stats: SkipStats, skip: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Samples of one shard in storage order, the first ``skip`` passed over without decoding.

    Plain tars are parsed by ``tar_members`` (fast); compressed ones by webdataset's
    ``tar_file_iterator``. Members are grouped into samples by webdataset's ``group_by_keys``.
    An unreadable or truncated shard is counted once in ``stats`` (reason ``bad_shard``) and
    ends early, keeping the samples read before the damage; strict mode raises instead.
    """
    reported = False

    def handler(exn: Exception) -> bool:
        nonlocal reported
        if isinstance(exn, CorruptSampleError):
            raise exn  # strict mode: never let webdataset's handlers swallow it
        if not reported:
            reported = True
            detail = exn.args[0] if exn.args else ""
            stats.skip("bad_shard", url, None, f"unreadable tar data ({type(exn).__name__}: {detail})")
        return False  # after a tar error the rest of the shard cannot be trusted

    try:
        stream = open_shard(url)
    except OSError as exc:
        stats.skip("bad_shard", url, None, f"cannot open ({exc})")
        return
    try:
        try:
            head = stream.read(BLOCK)
        except OSError as exc:
            handler(exc)
            return
        compressed = looks_compressed(head)
        if skip and not compressed and stream.seekable():
            stream.seek(-len(head), os.SEEK_CUR)
            start = stream.tell()
            if seek_to_sample(stream, skip):
                skip = 0
            else:
                stream.seek(start)  # headers we do not parse ourselves: read past them instead
            head = b""
        if compressed:
            members = tar_file_iterator(_Prepended(head, stream), handler=handler)
        else:
            members = iter_members(stream.read, head, url)
        samples = group_by_keys(_guarded(members, url, handler), keys=split_key, handler=handler)
        stop = None if limit is None else skip + limit
        yield from islice(samples, skip, stop)
    finally:
        stream.close()


class _Prepended:
    """A read-only stream that first returns bytes already consumed from ``stream``."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out


def _guarded(members, url: str, handler):
    # group_by_keys wants __url__ on every member; errors raised while reading end the shard.
    try:
        for m in members:
            m["__url__"] = url
            yield m
    except (TarFormatError, OSError, EOFError, ValueError) as exn:
        handler(exn)


def split_key(fname: str) -> tuple[str | None, str | None]:
    """webdataset's key/suffix rule (key = path up to the first dot of the file name), regex-free."""
    slash = fname.rfind("/") + 1
    dot = fname.find(".", slash)
    if dot <= slash:
        return None, None
    return fname[:dot], fname[dot + 1:]


def check_sample(sample: dict, image_format: str, num_attrs: int, image_bytes: int | None, stats: SkipStats) -> bool:
    """Cheap checks done before shuffling, so a resumed run consumes the same samples.

    Raw images are fully validated here (length); PNG/JPEG can only fail at decode time.
    """
    ext = IMAGE_EXT[image_format]
    key, url = sample.get("__key__"), sample.get("__url__", "?")
    data = sample.get(ext)
    if data is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        stats.skip("missing_key", url, key, f"no .{ext} member (has {present})")
        return False
    if num_attrs:
        attrs = sample.get(ATTRS_EXT)
        if attrs is None:
            stats.skip("missing_key", url, key, f"no .{ATTRS_EXT} attribute member")
            return False
        if len(attrs) != 4 * num_attrs:
            stats.skip("corrupt_attrs", url, key, f"attribute member has {len(attrs)} bytes, expected {4 * num_attrs}")
            return False
    if image_bytes is not None and len(data) != image_bytes:
        stats.skip("corrupt_image", url, key, f"raw image has {len(data)} bytes, expected {image_bytes}")
        return False
    return True


def count_samples(url: str) -> int:
    """Samples in one shard, for shard sets without a manifest (reads headers only when local)."""
    if is_local(url):
        import tarfile

        keys = 0
        last = None
        path = url[len("file://"):] if url.startswith("file://") else url
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                base = os.path.basename(member.name)
                key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                if key != last:
                    keys += 1
                    last = key
        return keys
    return sum(1 for _ in iter_shard(url, SkipStats()))
