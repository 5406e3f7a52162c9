"""The loader: exact coverage for evaluation, reproducible training streams, flips, resume,
bad samples, and awkward shard counts."""

import io
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

from data_shards.synthetic import make_synthetic_shards, render
from data_testing import sample_offsets
from diti_fast.data import (
    CorruptSampleError,
    DataWarning,
    ShardSpec,
    eval_loader,
    read_manifest,
    to_model_input,
    train_loader,
)

S = 8  # tiny images keep multi-worker tests fast
SEED = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    make_synthetic_shards(out, 150, image_size=S, seed=SEED, maxcount=31)  # 5 shards: 31*4 + 26
    return out


@pytest.fixture(scope="module")
def reference():
    images, attrs = render(range(150), S, seed=SEED)
    return images.transpose(0, 3, 1, 2), attrs


def _indices(loader):
    return [int(i) for b in loader for i in b["index"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_two_ranks_cover_every_sample_once(shards, reference, workers):
    seen, lengths = [], []
    for rank in range(2):
        ev = eval_loader(shards, batch_size=8, rank=rank, world_size=2, num_workers=workers)
        batches = list(ev)
        lengths.append((len(batches), len(ev)))
        for b in batches:
            idx = b["index"].numpy()
            assert np.array_equal(b["image"].numpy(), reference[0][idx])  # no flip in evaluation
            assert np.array_equal(b["attrs"].numpy(), reference[1][idx])
            assert b["key"] == [f"{i:09d}" for i in idx]
            seen.extend(idx.tolist())
        assert ev.stats["samples"] == 75 and ev.stats["skipped"] == 0
    assert sorted(seen) == list(range(150))
    assert all(n == expected for n, expected in lengths)


def test_eval_order_is_storage_order_without_workers(shards):
    assert _indices(eval_loader(shards, batch_size=7)) == list(range(150))


def test_fewer_shards_than_ranks_times_workers(tmp_path, reference):
    make_synthetic_shards(tmp_path, 150, image_size=S, seed=SEED, maxcount=150)  # a single shard
    seen = []
    for rank in range(2):
        with pytest.warns(DataWarning, match="1 shard.*2 rank.*2 worker"):
            ev = eval_loader(tmp_path, batch_size=8, rank=rank, world_size=2, num_workers=2)
        seen += _indices(ev)
    assert sorted(seen) == list(range(150))
    with pytest.warns(DataWarning, match="resampled"):
        tl = train_loader(tmp_path, batch_size=10, epoch_samples=100, rank=1, world_size=2, num_workers=2)
    assert sum(len(b["image"]) for b in tl) == 50


def test_more_ranks_than_samples(shards):
    with pytest.warns(DataWarning):
        ev = eval_loader(shards, batch_size=4, rank=0, world_size=200)
    assert _indices(ev) == [] and len(ev) == 0 and ev.max_batches == 1
    with pytest.warns(DataWarning):
        assert _indices(eval_loader(shards, batch_size=4, rank=199, world_size=200)) == [149]


def _stream(shards, **kw):
    args = dict(batch_size=10, seed=7, epoch_samples=120, rank=0, world_size=2, num_workers=0, shuffle_buffer=40)
    args.update(kw)
    return [(b["index"].clone(), b["image"].clone(), b["attrs"].clone()) for b in train_loader(shards, **args)]


def test_train_stream_reproducible_and_worker_independent(shards):
    base = _stream(shards)
    assert len(base) == 120 // 2 // 10
    with warnings.catch_warnings(record=True) as caught:  # torch also warns: 3 workers on 2 cores
        warnings.simplefilter("always")
        odd = _stream(shards, num_workers=3)  # 3 does not divide the 8 streams: slower, same data
    assert any("does not divide streams" in str(w.message) for w in caught)
    for other in (_stream(shards), _stream(shards, num_workers=2), odd):
        assert len(other) == len(base)
        for (i1, x1, a1), (i2, x2, a2) in zip(base, other):
            assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(a1, a2)
    flat = lambda run: torch.cat([i for i, _, _ in run]).tolist()  # noqa: E731
    assert flat(_stream(shards, seed=8)) != flat(base)
    assert flat(_stream(shards, start_epoch=1)) != flat(base)
    assert flat(_stream(shards, rank=1)) != flat(base)
    # Shuffled, not storage order, and drawn from across the set.
    idx = flat(base)
    assert idx != sorted(idx) and max(idx) - min(idx) > 75


def test_skip_batches_resumes_the_same_stream(shards):
    full = _stream(shards, num_workers=0)
    resumed = _stream(shards, num_workers=2, skip_batches=4)
    assert len(resumed) == len(full) - 4
    for (i1, x1, _), (i2, x2, _) in zip(full[4:], resumed):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)


def test_train_batch_contract(shards, reference):
    loader = train_loader(shards, batch_size=16, seed=0, epoch_samples=64, num_workers=0, hflip=True)
    assert len(loader) == 4
    flipped = same = 0
    for b in loader:
        assert set(b) == {"image", "index", "attrs"}
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (16, 3, S, S) and b["image"].is_contiguous()
        assert b["index"].dtype == torch.int64 and b["attrs"].dtype == torch.float32 and b["attrs"].shape == (16, 9)
        for img, i in zip(b["image"].numpy(), b["index"].numpy()):
            ref = reference[0][i]
            if np.array_equal(img, ref):
                same += 1
            else:
                assert np.array_equal(img, ref[:, :, ::-1])  # a horizontal mirror, nothing else
                flipped += 1
    assert flipped > 10 and same > 10
    no_flip = train_loader(shards, batch_size=16, seed=0, epoch_samples=64, hflip=False)
    for b in no_flip:
        assert np.array_equal(b["image"].numpy(), reference[0][b["index"].numpy()])


def test_to_model_input():
    x = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 2, 3)
    y = to_model_input(x, "cpu")
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.double(), x.double() / 127.5 - 1, rtol=0, atol=1e-6)
    assert y.min() == -1 and y.max() == 1
    assert to_model_input(x, "cpu", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_model_input(x.float(), "cpu")


def test_shard_inputs_dir_pattern_list_and_no_manifest(shards, tmp_path):
    m = read_manifest(shards)
    assert m["num_samples"] == 150 and m["image_size"] == S and m["channels"] == 3
    assert {"name", "num_samples", "sha256"} <= set(m["shards"][0])
    pattern = str(shards / "shard-{000000..000004}.tar")
    listed = [s["path"] for s in m["shards"]][:2]
    assert ShardSpec.resolve(pattern).counts == [31, 31, 31, 31, 26]
    assert ShardSpec.resolve(listed).num_samples == 62
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy(shards / name, bare / name)
    spec = ShardSpec.resolve(str(bare / "shard-{000000..000001}.tar"))
    assert spec.manifest is None and spec.image_size == S and spec.num_attrs == 9 and spec.counts is None
    assert _indices(eval_loader(spec, batch_size=9)) == list(range(62))
    # Without a manifest the epoch is the set's size, from one counting pass.
    assert len(train_loader(str(bare / "shard-{000000..000001}.tar"), batch_size=4)) == 62 // 4


# --- bad data -------------------------------------------------------------------------------------

def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def damaged(tmp_path, reference):
    """One shard of 12 samples of which 3 are bad: truncated raw image, no attributes, no image."""
    images, attrs = reference
    members = []
    for i in range(12):
        img, att = images[i].tobytes(), attrs[i].astype("<f4").tobytes()
        if i == 3:
            img = img[:-5]
        key = f"{i:09d}"
        if i != 8:
            members.append((f"{key}.u8", img))
        if i != 5:
            members.append((f"{key}.f32", att))
    _tar(tmp_path / "bad.tar", members)
    return [str(tmp_path / "bad.tar")]


def test_bad_samples_skipped_counted_and_summarised_once(damaged):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = eval_loader(damaged, batch_size=5)
        got = _indices(ev)
    summaries = [w for w in caught if issubclass(w.category, DataWarning)]
    assert got == [i for i in range(12) if i not in (3, 5, 8)]
    assert len(summaries) == 1
    assert "skipped 3" in str(summaries[0].message) and "decode=1" in str(summaries[0].message)
    assert ev.stats["skipped_by_reason"] == {"decode": 1, "missing_image": 1, "missing_label": 1}

    with pytest.warns(DataWarning) as record:
        tl = train_loader(damaged, batch_size=4, epoch_samples=40, num_workers=2, seed=1, shuffle_buffer=1)
        idx = _indices(tl)
    messages = [str(w.message) for w in record]
    assert sum("train epoch 0 rank 0: skipped" in m for m in messages) == 1, messages
    assert len(idx) == 40 and not {3, 5, 8} & set(idx)
    # No manifest and a one-sample buffer: each of the 8 streams reads the shard in storage order. A
    # read yields the 9 good samples 0,1,2,4,6,7,9,10,11; sample 3 (short raw image) lies before the
    # 4th, 5 (no label) before the 5th, 8 (no image) before the 7th. Streams 0-1 took two batches
    # (8 samples), streams 2-7 one (4): decode 2 + 6, missing_label 2, missing_image 2.
    assert tl.stats["skipped_by_reason"] == {"decode": 8, "missing_label": 2, "missing_image": 2}


def test_strict_mode_raises(damaged):
    with pytest.raises(CorruptSampleError, match=r"bad\.tar: sample 000000003"):
        list(eval_loader(damaged, batch_size=5, strict=True))
    with pytest.raises(Exception, match="000000003|000000005|000000008"):
        list(train_loader(damaged, batch_size=4, epoch_samples=40, num_workers=1, strict=True))


def test_corrupt_png_skipped(tmp_path, reference):
    from PIL import Image

    members = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(reference[0][i].transpose(1, 2, 0)).save(buf, format="PNG")
        data = buf.getvalue() if i != 2 else b"\x89PNG garbage"
        members += [(f"{i:09d}.png", data), (f"{i:09d}.f32", reference[1][i].astype("<f4").tobytes())]
    _tar(tmp_path / "p.tar", members)
    with pytest.warns(DataWarning, match="decode=1"):
        batches = list(eval_loader([str(tmp_path / "p.tar")], batch_size=3))
    assert [len(b["index"]) for b in batches] == [2, 3]
    for b in batches:
        assert np.array_equal(b["image"].numpy(), reference[0][b["index"].numpy()])


def test_truncated_shard_keeps_what_it_can(shards, tmp_path):
    src = shards / "shard-000001.tar"  # samples 31..61 in storage order (no shuffle in synthetic sets)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: sample_offsets(src)["000000045"] + 100])  # inside 45's first header
    with pytest.warns(DataWarning, match=r"bad_shard=1\)"):
        ev = eval_loader([str(shards / "shard-000000.tar"), str(cut)], batch_size=8)
        idx = _indices(ev)
    assert idx == list(range(45))
    assert ev.stats["skipped_by_reason"] == {"bad_shard": 1}
    assert "cut.tar: unreadable tar data (TarFormatError: truncated header" in ev.stats["examples"][0]


def test_shard_shorter_than_manifest(shards, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    with tarfile.open(shards / "shard-000001.tar") as tf:  # samples 31..61; keep 31..50
        members = [(m.name, tf.extractfile(m).read()) for m in tf if int(m.name.split(".")[0]) < 51]
    _tar(copy / "shard-000001.tar", members)
    seen = []
    with pytest.warns(DataWarning, match="short_shard=1"):
        for rank in range(2):
            seen += _indices(eval_loader(copy, batch_size=8, rank=rank, world_size=2, num_workers=0))
    # Positions of the missing samples stay reserved: nothing shifts onto another rank twice.
    assert sorted(seen) == [i for i in range(150) if not 51 <= i < 62]


def test_program_exits_with_a_worker_iterator_left_open(shards, tmp_path):
    """An uncaught exception keeps a half-read loader alive in its traceback. Our workers ignore
    SIGTERM (the main process owns shutdown), so without the loader's exit hook multiprocessing's
    own exit hook (SIGTERM, then join) would wait on them forever."""
    import subprocess
    import sys
    script = tmp_path / "crash.py"
    script.write_text(
        "from diti_fast.data import train_loader\n"
        f"it = iter(train_loader({str(shards)!r}, batch_size=4, num_workers=2))\n"
        "next(it)\n"
        "raise RuntimeError('crash with the loader open')\n")
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the program hung at exit with loader workers open")
    assert proc.returncode == 1
    assert "crash with the loader open" in proc.stderr
