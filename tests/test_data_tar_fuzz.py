"""Damaged tars never hang or crash a reader: a seeded corpus of mutated shards.

Each case takes one of a few small, valid shards (ustar, GNU long names, pax records) written by
Python's ``tarfile``, damages it (random byte flips in headers or payloads, truncation, or a header
field rewritten with a correct checksum so the damage gets past the checksum: sizes, pax record
lengths, GNU long-name sizes) and reads it the way training does (``iter_shard``, from the start
or skipping ahead with the header-only seek). Every read must end within a few seconds, raise
nothing, and either count the shard once as ``bad_shard`` (naming it) or return exactly the
members ``tarfile`` reads from the same bytes. A failing case prints its seed, so it replays.
"""
import io
import random
import tarfile
import time

import pytest

from data_testing import time_bound
from diti_fast.data.shard_reader import iter_shard
from diti_fast.data.skip_stats import SkipStats
from diti_fast.data.tar_members import BLOCK

CASES = 320
CASE_LIMIT_S = 3  # a read of a few KiB takes milliseconds; only a spinning loop reaches this


def _tar(fmt, members, pax=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1234567890
            if pax and i in pax:
                info.pax_headers = pax[i]
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _bases() -> list[bytes]:
    rng = random.Random(0)
    plain = [(f"{i:09d}.{e}", rng.randbytes(n)) for i in range(5) for e, n in (("u8", 48), ("f32", 8))]
    long = [(f"d/{'x' * 110}{i:03d}.{e}", rng.randbytes(n)) for i in range(3) for e, n in (("u8", 700), ("cls", 1))]
    return [
        _tar(tarfile.USTAR_FORMAT, plain),
        _tar(tarfile.GNU_FORMAT, long),
        _tar(tarfile.PAX_FORMAT, long, pax={0: {"comment": "c" * 40}, 3: {"comment": "é"}}),
        _tar(tarfile.PAX_FORMAT, plain, pax={2: {"comment": "a pax record"}, 6: {"path": "000000003.u8"}}),
    ]


def _headers(raw: bytes) -> list[tuple[int, int]]:
    """(offset, type byte) of every header block, walking the intact archive."""
    out, pos = [], 0
    while pos + BLOCK <= len(raw) and raw[pos:pos + BLOCK].count(0) != BLOCK:
        hdr = raw[pos:pos + BLOCK]
        out.append((pos, hdr[156]))
        size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out


_READ_FIELDS = [range(0, 100), range(124, 136), range(156, 157), range(257, 263), range(345, 500)]


def _fix_checksum(buf: bytearray, at: int) -> None:
    hdr = buf[at:at + BLOCK]
    hdr[148:156] = b" " * 8
    buf[at + 148:at + 156] = b"%06o\0 " % sum(hdr)


def _mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes, bytes]:
    """(kind, damaged bytes, the bytes tarfile reads as the reference: the same but where noted)"""
    buf, heads = bytearray(raw), _headers(raw)
    kind = rng.choice(["flip", "flip_header", "truncate", "size", "pax_length", "long_name_size", "checksum"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == "flip_header":
        at, fix = rng.choice(heads)[0], rng.random() < 0.5
        for _ in range(rng.randint(1, 4)):
            # With a repaired checksum, only fields the reader interprets (name, size, type, magic,
            # prefix): tarfile, the reference, also refuses damage in fields nobody here reads.
            field = rng.choice(_READ_FIELDS) if fix else range(BLOCK)
            buf[at + rng.choice(field)] = rng.randrange(256)
        if fix:
            _fix_checksum(buf, at)
    elif kind == "truncate":
        buf = buf[:rng.randrange(len(buf))]
    elif kind in ("size", "long_name_size"):
        wanted = [h for h in heads if h[1] == ord("L")] if kind == "long_name_size" else heads
        at = rng.choice(wanted or heads)[0]
        field = rng.choice([b"-1", b"-1000", b"0", b"7", b"77777777777", b"1" + b"0" * 10, b"9",
                            b"%o" % rng.randrange(1, 1 << 16), b"\xff" * 11, b"\x80" + b"\x7f" * 10, b" + 10"])
        buf[at + 124:at + 136] = field[:11].ljust(11, b"\0") + b"\0"
        _fix_checksum(buf, at)
        if buf[at + 156] == ord("L") and field.isdigit() and b"8" not in field and b"9" not in field \
                and int(field, 8) < BLOCK:
            # tarfile takes a long name up to the first NUL of its whole padded block, past the
            # record's declared size; the reference copy blanks that padding so both readers agree.
            ref = bytearray(buf)
            ref[at + BLOCK + int(field, 8):at + 2 * BLOCK] = bytes(BLOCK - int(field, 8))
            return kind, bytes(buf), bytes(ref)
    elif kind == "pax_length":
        paxes = [h[0] for h in heads if h[1] == ord("x")]
        if not paxes:
            return _mutate(raw, rng)
        body = paxes[rng.randrange(len(paxes))] + BLOCK
        end = body + int(raw[body - BLOCK + 124:body - BLOCK + 136].strip(b"\0 "), 8)
        starts = [body] + [i + 1 for i in range(body, end - 1) if buf[i] == 0x0A]
        at = rng.choice(starts)
        space = buf.index(b" ", at)
        new = rng.choice([b"0", b"00", b"1", b"2", b"-5", b"99999", b"%d" % rng.randrange(1, 200), b"", b"x"])
        buf[at:space] = new.ljust(space - at, b"0")[:max(space - at, len(new))]
    else:  # checksum field itself
        at = rng.choice(heads)[0]
        buf[at + 148:at + 156] = rng.choice([b"-1\0     ", b"       \0", b"\xff" * 8, b"%06o\0 " % rng.randrange(1 << 17)])
    return kind, bytes(buf), bytes(buf)


def _tarfile_members(data: bytes):
    """The independent reference: regular members as Python's tarfile reads them, or None when it
    refuses the archive."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            out = []
            for m in tf:
                if m.isreg():
                    out.append((m.name, tf.extractfile(m).read()))
            return out
    except (tarfile.TarError, ValueError, EOFError, OSError, UnicodeError):
        return None


def _members_of(samples) -> list[tuple[str, bytes]]:
    return [(f"{s['__key__']}.{k}", v) for s in samples for k, v in s.items() if not k.startswith("__")]


def _as_samples(members) -> list[tuple[str, bytes]]:
    """webdataset's naming on tarfile's members: the key is the path up to the first dot of the file
    name (names without one, or starting with one, are not sample members; nor are ``__x__``
    files), the suffix after it lower-cased."""
    out = []
    for name, data in members:
        head, _, base = name.rpartition("/")
        if base.startswith("__") and base.endswith("__") or base.find(".") <= 0:
            continue
        stem, _, ext = base.partition(".")
        out.append((f"{head}/{stem}.{ext.lower()}" if head else f"{stem}.{ext.lower()}", data))
    return out


def test_mutated_shards_end_in_data_or_one_counted_skip(tmp_path):
    bases, kinds, outcomes = _bases(), {}, {"data": 0, "bad_shard": 0}
    started = time.perf_counter()
    for case in range(CASES):
        rng = random.Random(case)
        kind, data, ref = _mutate(bases[case % len(bases)], rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        path = tmp_path / f"case{case}.tar"
        path.write_bytes(data)
        skip = rng.choice([0, 0, 2])
        stats = SkipStats()
        what = f"case {case} (seed {case}, {kind}, skip {skip})"
        with time_bound(CASE_LIMIT_S, what):
            try:
                samples = list(iter_shard(str(path), stats, skip=skip))
            except Exception as exc:  # noqa: BLE001 - any escape is the failure being looked for
                pytest.fail(f"{what}: the read raised {type(exc).__name__}: {exc}")
        assert set(stats.counts) <= {"bad_shard"} and stats.counts["bad_shard"] <= 1, (what, stats.as_dict())
        if stats.counts["bad_shard"]:
            outcomes["bad_shard"] += 1
            assert stats.examples[0].startswith(f"{path}: "), (what, stats.examples)
            continue
        outcomes["data"] += 1
        expected = _tarfile_members(ref)
        assert expected is not None, f"{what}: read without a skip, but tarfile refuses these bytes"
        expected = _as_samples(expected)
        if skip == 0:
            assert _members_of(samples) == expected, what
        else:
            assert _members_of(samples) == expected[len(expected) - len(_members_of(samples)):], what
    elapsed = time.perf_counter() - started
    print(f"{CASES} mutated shards in {elapsed:.1f} s: {outcomes}, by mutation {kinds}")
    # The corpus exercises both endings and every mutation kind.
    assert outcomes["data"] > 20 and outcomes["bad_shard"] > 100 and len(kinds) == 7, (outcomes, kinds)
