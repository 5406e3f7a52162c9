"""Helpers of the data tests: a real HTTP server, a tiny engine config, hand-built tar shards.

``ShardServer``: a real HTTP server on 127.0.0.1 (a free port) serving a directory. ``drop``:
{URL path: bytes} — those files are announced with their full Content-Length, but the connection
is closed after that many bytes (a download that dies mid-shard). ``stall``: {URL path: bytes} —
after that many bytes the server sends nothing more but keeps the connection open until it shuts
down (a stalled server). ``hits`` counts GETs per path.
"""
from __future__ import annotations

import functools
import io
import signal
import tarfile
import threading
from collections import Counter
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    drop: dict = {}
    stall: dict = {}
    hits: Counter = Counter()
    closing: threading.Event = threading.Event()

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.hits[self.path] += 1
        super().do_GET()

    def copyfile(self, source, outputfile):
        if self.path in self.stall:
            outputfile.write(source.read(self.stall[self.path]))
            outputfile.flush()
            self.closing.wait(120)  # silent, connection open; released when the server shuts down
            self.close_connection = True
            return
        cut = self.drop.get(self.path)
        if cut is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(cut))
        outputfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)  # the peer sees the connection end before Content-Length bytes


class ShardServer:
    def __init__(self, root: Path, drop: dict | None = None, stall: dict | None = None):
        self.hits: Counter = Counter()
        self.closing = threading.Event()
        handler = type("Handler", (_Handler,), {"drop": dict(drop or {}), "stall": dict(stall or {}),
                                                 "hits": self.hits, "closing": self.closing})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.httpd.handle_error = lambda *args: None  # clients that stop reading early are normal here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_config(run_dir, *overrides: str):
    """The engine tests' tiny run (32-channel UNet, batch 4, one thread), reading shards."""
    from test_train_engine import TINY  # one tiny model for all engine tests

    from diti_fast.engine.config_files import apply_overrides, build_config
    base = ["data.source=shards", "data.num_workers=0", "data.shuffle_buffer=16", "checkpoint.keep=1"]
    return build_config(apply_overrides(TINY, [f"run.dir={run_dir}", *base, *overrides]), "test")


def metrics(run_dir) -> list[dict]:
    import json
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def write_tar(path, members) -> Path:
    """A plain tar of (name, bytes) members, in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return Path(path)


def sample_offsets(path) -> dict[str, int]:
    """Byte offset of each sample's first header in a tar (to cut a shard between samples)."""
    out: dict[str, int] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            out.setdefault(m.name.split(".", 1)[0], m.offset)
    return out


class Hang(BaseException):
    """Raised by :func:`time_bound`'s alarm. A BaseException, so that no handler in the reader can take
    it for damage (TimeoutError is an OSError, which the reader counts as a bad shard)."""


@contextmanager
def time_bound(seconds: int, what: str):
    """Turns a hang into a failure naming ``what``. Not a speed check: the limit is far above the
    expected time."""
    def fail(*_):
        raise Hang(f"{what}: still running after {seconds} s (it spins or waits instead of stopping)")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
