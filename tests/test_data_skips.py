"""Every skipped sample counted by cause, exactly, in the loader and in the engine's metrics; a set
that never yields a usable sample stops with an error; data.verify refuses a shard by name.

The training counts are checked against a closed form. A single shard without a manifest is read
from its start by every virtual stream, and a one-sample shuffle buffer makes a stream consume
samples in storage order, so which bad samples a stream has passed after consuming P samples
follows from the shard's layout alone (``expected_counts``).
"""
import json

import numpy as np
import pytest

from data_testing import metrics, sample_offsets, time_bound, tiny_config, write_tar
from diti_fast.config import ConfigError
from diti_fast.data import CorruptSampleError, DataError, DataWarning, ShardSpec, eval_loader, train_loader
from diti_fast.data.skip_stats import REASONS
from diti_fast.engine.loop import train

S, A = 16, 2
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 3, S, S), dtype=np.uint8)
ATTRS = RNG.random((10, A)).astype("<f4")


def _u8(i):
    return IMAGES[i].tobytes()


def _f32(i):
    return ATTRS[i].tobytes()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """One shard: good, no label, good, undecodable jpg, good, 8x8 raw image, good, then cut inside
    sample 7's header. A read yields 5 samples that pass the cheap checks (0, 2, 3, 4, 6)."""
    d = tmp_path_factory.mktemp("skips")
    members = []
    for i in range(8):
        key = f"{i:09d}"
        if i == 1:
            members += [(f"{key}.u8", _u8(i))]
        elif i == 3:
            members += [(f"{key}.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), (f"{key}.f32", _f32(i))]
        elif i == 5:
            members += [(f"{key}.u8", bytes(3 * 8 * 8)), (f"{key}.f32", _f32(i))]
        else:
            members += [(f"{key}.u8", _u8(i)), (f"{key}.f32", _f32(i))]
    full = write_tar(d / "full.tar", members)
    cut = d / "a.tar"
    cut.write_bytes(full.read_bytes()[: sample_offsets(full)["000000007"] + 100])
    return cut


def _crossed(pulls: int) -> dict:
    """Skips passed by the first ``pulls`` samples drawn from the shard (5 pass the checks per read).
    The cut is met while the 5th is read: webdataset groups a sample when the next one begins."""
    if pulls == 0:
        return dict.fromkeys(REASONS, 0)
    r, k = (pulls - 1) // 5, pulls - 5 * ((pulls - 1) // 5)  # finished reads, position in this one
    return dict.fromkeys(REASONS, 0) | {"missing_label": r + (k >= 2), "size": r + (k >= 5),
                                        "bad_shard": r + (k >= 5)}


def _decodes(consumed: int) -> int:
    return (consumed + 2) // 5  # the 3rd sample of every read (consumed 3, 8, 13, ...) is the bad jpg


def _pulled(batches: int, micro: int) -> int:
    # A batch whose jpg fails tops the (empty, one-sample) buffer up with the next sample, which the
    # next batch would read anyway: skips behind it count with that batch.
    last = range(micro * (batches - 1) + 1, micro * batches + 1)
    return micro * batches + any(c % 5 == 3 for c in last) if batches else 0


def expected_counts(batches: int, micro: int, streams: int = 8, first: int = 0) -> dict:
    """Counts of an epoch's batches ``first`` .. ``batches``-1, spread over ``streams`` streams
    round-robin; batches before ``first`` were read past (a resume), without decoding or counting."""
    out = dict.fromkeys(REASONS, 0)
    for v in range(streams):
        n, m = len(range(v, batches, streams)), len(range(v, first, streams))
        end, start = _crossed(_pulled(n, micro)), _crossed(micro * m)
        for k in REASONS:
            out[k] += end[k] - start[k]
        out["decode"] += _decodes(micro * n) - _decodes(micro * m)
    return out


def _nonzero(d):
    return {k: v for k, v in d.items() if v}


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_counts_each_skip_once(layout, workers):
    kw = dict(batch_size=4, seed=1, epoch_samples=4 * 13, shuffle_buffer=1, size_mismatch="skip")
    with pytest.warns(DataWarning):
        tl = train_loader(str(layout), num_workers=workers, **kw)
        idx = [int(i) for b in tl for i in b["index"]]
    assert len(idx) == 52 and set(idx) <= {0, 2, 4, 6}  # rows of the bad jpg refilled, batches full
    assert tl.stats["skipped_by_reason"] == _nonzero(expected_counts(13, 4))
    # Resumed after 5 batches: the read-past batches are not counted again.
    with pytest.warns(DataWarning):
        resumed = train_loader(str(layout), num_workers=workers, skip_batches=5, **kw)
        rest = [int(i) for b in resumed for i in b["index"]]
    assert rest == idx[20:]
    assert resumed.stats["skipped_by_reason"] == _nonzero(expected_counts(13, 4, first=5))


def test_eval_pass_counts_every_cause(layout, tmp_path):
    b = write_tar(tmp_path / "b.tar", [
        ("000000010.u8", _u8(0)), ("000000010.f32", _f32(0)),
        ("000000011.f32", _f32(1)),                                        # no image
        ("000000012.u8", _u8(2)), ("000000012.f32", _f32(2)[:5]),          # 5-byte label vector
        ("000000013.u8", _u8(3)), ("000000013.json", b'{"attr0": 1'),    # json that does not parse
        ("000000014.u8", _u8(4)), ("000000014.f32", _f32(4))])
    c = write_tar(tmp_path / "c.tar", [(f"00000002{i}.{e}", (_u8 if e == "u8" else _f32)(i))
                                       for i in range(2) for e in ("u8", "f32")])
    spec = ShardSpec([str(layout), str(b), str(c)], image_size=S, counts=[8, 5, 3], size_mismatch="skip",
                     attributes=[{"name": f"attr{i}", "kind": "continuous"} for i in range(A)])
    with pytest.warns(DataWarning, match="skipped 8 bad sample"):
        ev = eval_loader(spec, batch_size=3, num_workers=2)
        idx = sorted(int(i) for batch in ev for i in batch["index"])
    assert idx == [0, 2, 4, 6, 10, 14, 20, 21]
    assert ev.stats["skipped_by_reason"] == {"missing_label": 1, "decode": 1, "size": 1, "bad_shard": 1,
                                             "missing_image": 1, "bad_label": 2, "short_shard": 1}


def test_engine_metrics_report_exact_skip_counts(layout, tmp_path):
    steps, micro = 11, 4
    res = train(tiny_config(tmp_path, "stage=ddpm", f"data.shards={layout}", "data.num_samples=400",
                            "data.shuffle_buffer=1", "data.size_mismatch=skip", f"run.max_images={steps * micro}"))
    assert res.status == "done"
    rows = metrics(tmp_path)
    for row in (rows[4], rows[-1]):  # cumulative since the launch, at every log step
        assert row["data_skipped"] == expected_counts(row["step"], micro)


def test_undecodable_set_stops_with_the_cause(tmp_path):
    bad = [write_tar(tmp_path / f"bad{j}.tar", [(f"{j}{i:08d}.png", b"\x89PNG\r\n\x1a\n garbage") for i in range(20)])
           for j in range(3)]
    spec = ShardSpec([str(p) for p in bad], image_size=S, image_format="png", counts=[20] * 3)
    with time_bound(120, "a stream of undecodable samples"), pytest.raises(DataError) as err:
        list(train_loader(spec, batch_size=4, epoch_samples=40, num_workers=1, max_consecutive_skips=200))
    msg = str(err.value)
    assert "no usable sample in 200 attempts in a row" in msg and "bad" in msg and ".tar: sample" in msg
    assert "cannot decode png" in msg and "[decode]" in msg
    # Through the engine: without a manifest the first sample already says it (before any work) ...
    with pytest.raises(ConfigError, match=r"bad0\.tar: sample 000000000: the \.png image cannot be read"):
        train(tiny_config(tmp_path / "run", "stage=ddpm", f"data.shards={tmp_path}/bad{{0..2}}.tar",
                          "run.max_images=8", "data.num_samples=60"))
    # ... and with a manifest vouching for them, the stream stops (the default limit: 1000 attempts).
    manifest = {"format": "diti-fast-shards", "version": 1, "num_samples": 60, "image_size": S, "channels": 3,
                "image_format": "png", "attributes": [],
                "shards": [{"name": p.name, "num_samples": 20, "sha256": "?"} for p in bad]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with time_bound(120, "a stream of undecodable samples"), pytest.raises(DataError, match=r"no usable sample in 1000 attempts.*\[decode\]"):
        train(tiny_config(tmp_path / "run", "stage=ddpm", f"data.shards={tmp_path}", "run.max_images=8"))


def test_verify_refuses_a_shard_with_the_wrong_sha256(tmp_path):
    from data_shards.synthetic import make_synthetic_shards
    make_synthetic_shards(tmp_path / "set", 24, image_size=S, maxcount=8)
    assert len(list(train_loader(tmp_path / "set", batch_size=4, verify=True))) == 6  # intact: reads
    man = json.loads((tmp_path / "set" / "manifest.json").read_text())
    man["shards"][1]["sha256"] = "0" * 64
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(man))
    shard = tmp_path / "set" / "shard-000001.tar"
    with pytest.raises(DataError, match=rf"{shard}: sha256 .* does not match the manifest's 0000"):
        train_loader(tmp_path / "set", batch_size=4, verify=True)
    assert len(list(eval_loader(tmp_path / "set", batch_size=4))) == 6  # without verify: not checked
    with pytest.raises(ConfigError, match=r"shard-000001\.tar: sha256 .*refusing to read it \(data\.verify=true\)"):
        train(tiny_config(tmp_path / "run", "stage=ddpm", f"data.shards={tmp_path / 'set'}", "data.verify=true",
                          "run.max_images=4"))


def test_strict_mode_names_the_first_bad_sample(layout):
    with pytest.raises(CorruptSampleError, match=r"a\.tar: sample 000000001: no label member.*\[missing_label\]"):
        list(train_loader(str(layout), batch_size=4, epoch_samples=8, shuffle_buffer=1, strict=True))


@pytest.mark.slow
def test_two_ranks_report_the_sum_of_their_skips(layout, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diti_fast.engine.config_files import dump_yaml
    repo = Path(__file__).resolve().parents[1]
    steps, micro = 5, 4  # batch 8 over 2 ranks
    cfg = tiny_config(tmp_path / "two", "stage=ddpm", f"data.shards={layout}", "data.num_samples=400",
                      "data.shuffle_buffer=1", "data.size_mismatch=skip", "data.batch_size=8",
                      f"run.max_images={steps * 8}")
    (tmp_path / "two.yaml").write_text(dump_yaml(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    # --standalone: torchrun picks its rendezvous port itself and hands it to the ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(repo / "diti_fast" / "train.py"),
           "--config", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # Each rank's streams read the one shard the same way (no counts: no random offsets), so the
    # all-reduced record is twice one rank's closed form.
    one_rank = expected_counts(steps, micro)
    assert metrics(tmp_path / "two")[-1]["data_skipped"] == {k: 2 * v for k, v in one_rank.items()}
