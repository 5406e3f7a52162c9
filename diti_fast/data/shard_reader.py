"""Reading one shard as a stream of samples: local files directly, everything else through
webdataset's own opener (``pipe:``, ``http(s)://``, ``gs://``, ... via their command-line tools).

A sample is webdataset's dict: ``__key__``, ``__url__`` and one bytes value per member suffix.
Nothing here decodes images: skipping (resume, split boundaries) costs only tar reading.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from itertools import islice
from typing import Iterator
from urllib.parse import urlparse

# The module attribute ``webdataset.gopen`` is the function (the package re-exports it over the
# submodule's name), so the scheme table is imported from the submodule explicitly.
from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.tariterators import tar_file_iterator

from .codec import image_member, raw_side
from .errors import CorruptSampleError, DataError
from .labels import LabelError, read_labels
from .skip_stats import SkipStats
from .tar_members import BLOCK, TarFormatError, iter_members, looks_compressed, seek_to_sample

_LOCAL_BUFFER = 1 << 20  # fewer syscalls than the 8 KiB default when streaming local tars
_CHILD_EXIT_S = 30  # how long a closed download or pipe: command gets to exit before it is killed
# curl's exit codes that webdataset's http(s) opener can end with, in words.
_CURL_EXIT = {6: "cannot resolve the host", 7: "cannot connect", 18: "the transfer ended early (partial file)",
              22: "the server answered with an HTTP error (>= 400, e.g. 404 not found)",
              28: "timed out (data.stream_timeout_s in all, or data.stream_stall_s without progress)", 52: "the server sent nothing", 56: "the connection broke while receiving"}


# The command-line tool each of webdataset's URL openers runs, and where it comes from.
_TOOLS = {"http": "curl", "https": "curl", "sftp": "curl", "ftps": "curl", "scp": "curl", "gs": "gsutil"}
_PACKAGES = {"curl": "the curl package (e.g. apt-get install curl, dnf install curl, conda install curl)",
             "gsutil": "the Google Cloud SDK (gsutil)"}


@dataclass(frozen=True)
class StreamLimits:
    """How long a download (http(s) through curl) may take: ``timeout_s`` for the whole shard, and
    at most ``stall_s`` seconds below ``low_speed_bps`` bytes/s (a server that stops sending but
    keeps the connection open). Either ends the download, which then counts as a bad shard."""

    timeout_s: float = 3600.0
    stall_s: float = 60.0
    low_speed_bps: int = 1024
    connect_timeout_s: float = 30.0


DEFAULT_LIMITS = StreamLimits()


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def local_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://"):]
    return url[len("file:"):] if url.startswith("file:") else url


def check_url(url: str) -> None:
    """Refuse, before any work, a URL no opener handles (webdataset would fail on every read)."""
    if is_local(url):
        return
    scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
    if scheme not in gopen_schemes:
        known = ", ".join(sorted(k for k in gopen_schemes if not k.startswith("_")))
        raise DataError(f"{url}: no opener for scheme {scheme!r} (local paths, file:, {known})")
    tool = _TOOLS.get(scheme)
    if tool is not None and shutil.which(tool) is None:
        raise DataError(f"{url}: reading {scheme}:// shards needs the `{tool}` command, which is not on PATH; "
                        f"install {_PACKAGES[tool]}")


def open_shard(url: str, limits: StreamLimits = DEFAULT_LIMITS):
    if is_local(url):
        return open(local_path(url), "rb", buffering=_LOCAL_BUFFER)
    if urlparse(url).scheme in ("http", "https") and not url.startswith("pipe:"):
        check_url(url)  # curl present
        pipe = Pipe(curl_command(url, limits), mode="rb", bufsize=_LOCAL_BUFFER, ignore_status=[141, 23])
        return _Piped(pipe, download=True)
    stream = gopen(url, "rb")  # pipe:, gs: via gsutil, ...
    return _Piped(stream) if hasattr(stream, "proc") else stream


def curl_command(url: str, limits: StreamLimits = DEFAULT_LIMITS) -> list[str]:
    """curl for one shard: fails on HTTP errors, follows redirects, gives up after
    ``limits.timeout_s`` in all or ``limits.stall_s`` below ``limits.low_speed_bps`` (exit 28).
    No ``--retry``: a retry after part of the shard reached the pipe would send it a second time."""
    return ["curl", "--fail", "--silent", "--location",
            "--connect-timeout", f"{min(limits.connect_timeout_s, limits.timeout_s):g}",
            "--max-time", f"{limits.timeout_s:g}",
            "--speed-limit", str(int(limits.low_speed_bps)), "--speed-time", f"{max(1, round(limits.stall_s))}",
            url]


class _Piped:
    """The output of webdataset's child process (curl, gsutil, a pipe: command), read to its end
    before its exit status is judged. (webdataset's own Pipe raises from ``read`` as soon as the
    child has exited badly, dropping bytes already received: how many samples survive a broken
    download would then depend on timing.)"""

    def __init__(self, pipe, download: bool = False):
        # download: our own curl, which is stopped at once when closed early (it may be waiting on
        # a silent server, not writing, and so would not notice the closed pipe until it times out).
        self.pipe, self.status, self.download = pipe, None, download

    def read(self, n: int = -1) -> bytes:
        return self.pipe.stream.read(n)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.pipe.stream.closed:
            self.pipe.stream.close()  # a child still writing now exits (SIGPIPE / curl 23)
            if self.download and self.pipe.proc.poll() is None:
                self.pipe.proc.terminate()
            try:
                self.status = self.pipe.proc.wait(timeout=_CHILD_EXIT_S)
            except subprocess.TimeoutExpired:  # a command that ignores its closed output
                self.pipe.proc.kill()
                self.status = self.pipe.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exit_reason(url: str, stream) -> str | None:
    """Why a piped download failed, from its exit status (None when it did not fail)."""
    status = getattr(stream, "status", None)
    if status in (None, 0):
        return None
    if url.startswith("pipe:"):
        return f"the command exited with status {status}"
    return f"{_CURL_EXIT.get(status, 'the download failed')} (curl exit {status})"


def _close(url: str, stream, drained: bool) -> str | None:
    """Close; returns the download's failure when the whole stream was read (an early close makes
    the writer die of SIGPIPE, which says nothing about the data)."""
    if drained and isinstance(stream, _Piped):
        while stream.read(1 << 16):  # the tar's end padding; lets the child exit by itself
            pass
    stream.close()
    return exit_reason(url, stream) if drained else None


class ShardRead:
    """Samples of one shard in storage order, the first ``skip`` passed over without decoding.

    Plain tars are parsed by ``tar_members`` (fast); compressed ones by webdataset's
    ``tar_file_iterator``. Members are grouped into samples by webdataset's key rule (``_grouped``).
    An unreadable, truncated or failed download is counted once in ``stats`` (``bad_shard``) and
    ends early, keeping the samples read before the damage (``.damaged`` is then True); strict
    mode raises instead.
    """

    def __init__(self, url: str, stats: SkipStats, skip: int = 0, limit: int | None = None,
                 limits: StreamLimits = DEFAULT_LIMITS):
        self.url, self.stats, self.skip, self.limit, self.limits = url, stats, skip, limit, limits
        self.damaged = False
        self.ended = False  # the archive was read to its end (not cut off by ``limit``)
        self._stream = None
        self._pending: str | None = None

    def _bad(self, detail: str) -> None:
        if not self.damaged:
            self.damaged = True
            self.stats.skip("bad_shard", self.url, None, detail)

    def _handler(self, exn: Exception) -> bool:
        if isinstance(exn, (CorruptSampleError, DataError)):
            raise exn  # strict mode / the stall guard: never let webdataset's handlers swallow it
        detail = exn.args[0] if exn.args else ""
        detail = f"unreadable tar data ({type(exn).__name__}: {detail})"
        if isinstance(self._stream, _Piped):
            self._pending = detail  # reported at close, by the exit status when the download died
        else:
            self._bad(detail)
        return False  # after a tar error the rest of the shard cannot be trusted

    def __iter__(self) -> Iterator[dict]:
        url, skip = self.url, self.skip
        try:
            stream = self._stream = open_shard(url, self.limits)
        except (OSError, ValueError) as exc:
            self._bad(f"cannot open ({type(exc).__name__}: {exc})")
            return
        drained = False
        try:
            try:
                head = stream.read(BLOCK)
            except OSError as exc:
                self._bad(exit_reason(url, stream) or f"cannot read ({exc})")
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
                members = tar_file_iterator(_Prepended(head, stream), handler=self._handler)
            else:
                members = iter_members(stream.read, head, url)
            samples = self._grouped(self._guarded(members))
            stop = None if self.limit is None else skip + self.limit
            yield from islice(samples, skip, stop)
            drained = self.ended
        finally:
            # A download cut short shows as damaged tar data first; its exit status says why.
            pending, self._pending = self._pending, None
            failure = _close(url, stream, drained or pending is not None)
            if failure is not None or pending is not None:
                self._bad(failure or pending)

    def _grouped(self, members) -> Iterator[dict]:
        """Consecutive members sharing a key make one sample (webdataset's rule: the key is the
        path up to the first dot of the file name, suffixes lower-cased); a repeated suffix within
        a sample is damage."""
        url, current, key = self.url, None, None
        for m in members:
            k, ext = split_key(m["fname"])
            if k is None:
                continue
            if k != key:
                if current is not None:
                    yield current
                current, key = {"__key__": k, "__url__": url}, k
            ext = ext.lower()
            if ext in current:
                self._handler(ValueError(f"{m['fname']}: duplicate member in sample {k}"))
                current = None
                break
            current[ext] = m["data"]
        if current is not None:
            yield current

    def _guarded(self, members):
        # Errors raised while reading end the shard (counted once, as bad_shard).
        try:
            yield from members
            self.ended = True
        except (TarFormatError, OSError, EOFError, ValueError) as exn:
            self._handler(exn)


def iter_shard(url: str, stats: SkipStats, skip: int = 0, limit: int | None = None,
               limits: StreamLimits = DEFAULT_LIMITS) -> Iterator[dict]:
    return iter(ShardRead(url, stats, skip, limit, limits))


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


def split_key(fname: str) -> tuple[str | None, str | None]:
    """webdataset's key/suffix rule (key = path up to the first dot of the file name), regex-free."""
    slash = fname.rfind("/") + 1
    dot = fname.find(".", slash)
    if dot <= slash:
        return None, None
    return fname[:dot], fname[dot + 1:]


def check_sample(sample: dict, spec, stats: SkipStats) -> bool:
    """Cheap checks done before shuffling, so a resumed run consumes the same samples: an image
    member is present, labels parse (stored as ``__labels__``), raw images have a usable length.
    PNG/JPEG/WebP/PPM can only fail later, at decode time."""
    ext = image_member(sample, spec.image_format)
    key, url = sample.get("__key__"), sample.get("__url__", "?")
    if ext is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        stats.skip("missing_image", url, key, f"no image member (has {present})")
        return False
    sample["__image__"] = ext
    if spec.num_attrs:
        try:
            sample["__labels__"] = read_labels(sample, spec.attributes)
        except LabelError as exc:
            stats.skip(exc.reason, url, key, str(exc))
            return False
    if ext == "u8" and len(sample["u8"]) != spec.image_bytes:
        side = raw_side(len(sample["u8"]), spec.channels)
        if side is None:
            stats.skip("decode", url, key, f"raw image has {len(sample['u8'])} bytes, not 3×S×S for any S")
            return False
        if spec.size_mismatch != "resize":
            refuse_size(spec, stats, url, key, f"raw image is {side}x{side}, expected {spec.image_size}x{spec.image_size}")
            return False
    return True


def refuse_size(spec, stats: SkipStats, url: str, key: str | None, msg: str) -> None:
    """An image of another size under size_mismatch "skip" (counted) or "error" (raised)."""
    if spec.size_mismatch == "error":
        raise DataError(f"{url}: sample {key}: {msg} (data.size_mismatch=error; 'resize' center-crops and "
                        "resizes such samples on load, 'skip' skips and counts them)")
    stats.skip("size", url, key, msg)


def count_samples(url: str, on_sample=None, limits: StreamLimits = DEFAULT_LIMITS) -> int:
    """Samples in one shard, for shard sets without a manifest: tar headers only when local and
    plain, else one streaming pass (``on_sample`` sees each sample, e.g. to collect labels)."""
    if is_local(url) and on_sample is None:
        keys = 0
        last = None
        try:
            with tarfile.open(local_path(url), "r:") as tf:
                for member in tf:
                    if not member.isreg():
                        continue
                    base = os.path.basename(member.name)
                    key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                    if key != last:
                        keys += 1
                        last = key
            return keys
        except (tarfile.ReadError, OSError):
            pass  # compressed or damaged: count by streaming below
    n = 0
    for sample in iter_shard(url, SkipStats(), limits=limits):  # a damaged shard counts what it holds; reading it reports it
        n += 1
        if on_sample is not None:
            on_sample(sample)
    return n


def shard_sha256(url: str, limits: StreamLimits = DEFAULT_LIMITS) -> str:
    """sha256 of the whole shard; OSError when it cannot be read (a failed download says why)."""
    h = hashlib.sha256()
    with open_shard(url, limits) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    failed = exit_reason(url, f)
    if failed is not None:
        raise OSError(failed)
    return h.hexdigest()
