"""`python -m data_shards make` never replaces a shard set by accident, and never leaves a half one:
an --out that holds a set is refused before any work unless --overwrite is given; the new set is
written beside it and renamed into place when complete, so a run that dies leaves the old set
byte for byte as it was (and a re-run reuses what the dead run wrote)."""
import os

import pytest

import data_shards.writer as writer
from data_shards.__main__ import main
from diti_fast.data import eval_loader, read_manifest


def _make(out, num, *extra):
    return main(["make", "--source", "synthetic", "--num", str(num), "--image-size", "8", "--maxcount", "10",
                 "--workers", "1", "--no-progress", "--out", str(out), *map(str, extra)])


def _snapshot(out):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


def _indices(out):
    return sorted(int(i) for b in eval_loader(out, batch_size=100) for i in b["index"])


def test_a_shard_set_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "train"
    assert _make(out, 40) == 0
    before = _snapshot(out)
    capsys.readouterr()
    # Without --overwrite (a typo in --out pointing at an existing set): refused, nothing touched.
    assert _make(out, 6) == 2
    err = capsys.readouterr().err
    assert f"{out}: already holds a shard set of 40 samples in 4 shards; refusing to replace it. Pass --overwrite" in err
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["train"]
    # With it: the new set takes the directory's place, and nothing is left beside it.
    assert _make(out, 6, "--overwrite") == 0
    assert read_manifest(out)["num_samples"] == 6 and _indices(out) == list(range(6))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert sorted(os.listdir(tmp_path)) == ["train"]
    # The same set again, with --overwrite: its shards are reused, not rewritten.
    kept = _snapshot(out)
    assert _make(out, 6, "--overwrite") == 0
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".tar")} == \
        {k: v for k, v in kept.items() if k.endswith(".tar")}


def test_an_interrupted_overwrite_leaves_the_old_set_untouched(tmp_path, monkeypatch):
    out = tmp_path / "train"
    assert _make(out, 40) == 0
    before = _snapshot(out)
    real, calls = writer.write_tar, []

    def dies_on_the_third_shard(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is stopped part-way
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_tar", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _make(out, 50, "--overwrite", "--seed", 7)
    assert _snapshot(out) == before  # the old set: same files, same bytes, same times
    assert _indices(out) == list(range(40))
    staged = writer.staging_dir(out)
    assert sorted(p.name for p in staged.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    # The re-run finishes the job, reusing the two shards the dead run completed.
    monkeypatch.setattr(writer, "write_tar", real)
    calls.clear()
    monkeypatch.setattr(writer, "write_tar", lambda path, *a, **k: calls.append(path.name) or real(path, *a, **k))
    assert _make(out, 50, "--overwrite", "--seed", 7) == 0
    assert calls == [f"shard-00000{i}.tar" for i in range(2, 5)]
    assert read_manifest(out)["num_samples"] == 50 and _indices(out) == list(range(50))
    assert not staged.exists() and sorted(os.listdir(tmp_path)) == ["train"]
