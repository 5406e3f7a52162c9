"""The lean tar reader against Python's tarfile, and the header-only seek used for skipping."""

import gzip
import io
import os
import tarfile

import numpy as np
import pytest

from diti_fast.data.skip_stats import SkipStats
from diti_fast.data.shard_reader import iter_shard
from diti_fast.data.tar_members import seek_to_sample
from diti_fast.data.tar_members import TarFormatError, iter_members


def _archive(fmt, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1234567890
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(rng):
    return [
        ("a.txt", b"hello"),
        ("dir", None),
        ("dir/" + "n" * 150 + ".bin", rng.bytes(700)),  # needs a GNU long name or a pax path
        ("ünïcode/ké.y.png", rng.bytes(512)),  # exactly one block
        ("p" * 120 + "/" + "q" * 80 + ".z", rng.bytes(1)),
        ("empty.e", b""),
    ]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_matches_tarfile(fmt):
    raw = _archive(fmt, _members(np.random.default_rng(0)))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
    got = [(m["fname"], m["data"]) for m in iter_members(io.BytesIO(raw).read)]
    assert got == expected and len(got) == 5


def test_damage_is_reported():
    raw = _archive(tarfile.USTAR_FORMAT, [("x.a", os.urandom(2000)), ("y.b", b"1")])
    with pytest.raises(TarFormatError, match="truncated member data"):
        list(iter_members(io.BytesIO(raw[:1200]).read))
    with pytest.raises(TarFormatError, match="truncated header"):
        list(iter_members(io.BytesIO(raw[:300]).read))
    bad = bytearray(raw)
    bad[10] ^= 0x20  # a flipped bit in the first name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(bad)).read))


def _shard(tmp_path, n, fmt=tarfile.USTAR_FORMAT, name="s.tar"):
    members = []
    for i in range(n):
        members += [(f"{i:05d}.u8", bytes([i % 256]) * (3 * 4 * 4)), (f"{i:05d}.f32", np.float32(i).tobytes())]
    path = tmp_path / name
    path.write_bytes(_archive(fmt, members))
    return path


def test_seek_matches_reading_past(tmp_path):
    path = _shard(tmp_path, 40)
    for n in (0, 1, 17, 39, 40, 55):
        with open(path, "rb") as f:
            assert seek_to_sample(f, n)
            rest = [m["fname"] for m in iter_members(f.read)]
        assert rest == [f"{i:05d}.{e}" for i in range(n, 40) for e in ("u8", "f32")]
    # pax headers are not parsed by the seek: it declines and the caller reads past instead. Short
    # names alone get no pax header even in PAX_FORMAT, so one member carries a pax record.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(5):
            info = tarfile.TarInfo(f"{i:05d}.u8")
            info.size, info.mtime = 4, 1234567890
            if i == 1:
                info.pax_headers = {"comment": "a pax record"}
            tf.addfile(info, io.BytesIO(bytes([i]) * 4))
    raw = buf.getvalue()
    assert raw[1024 + 156:1024 + 157] == b"x"  # sample 1 (after 0's header + data block): a pax header
    with io.BytesIO(raw) as f:
        assert not seek_to_sample(f, 3)
        f.seek(0)
        assert [m["fname"] for m in iter_members(f.read)] == [f"{i:05d}.u8" for i in range(5)]


def test_compressed_shards_use_webdataset_reader(tmp_path):
    path = _shard(tmp_path, 12)
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    plain = [s["__key__"] for s in iter_shard(str(path), SkipStats(), skip=3, limit=5)]
    packed = [s["__key__"] for s in iter_shard(str(gz), SkipStats(), skip=3, limit=5)]
    assert plain == packed == [f"{i:05d}" for i in range(3, 8)]
