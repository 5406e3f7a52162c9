"""Shards streamed through webdataset's opener: a real HTTP server on 127.0.0.1 and pipe:cat.

Training (the engine, a few steps) and an evaluation pass read the same set over http:// (with
the manifest fetched from the server) and through pipe:cat; a server that drops the connection
mid-shard, or stalls without closing it, costs that shard's tail, counted exactly, and the run goes
on; a 404 is an error naming the URL; without curl, http(s) shards are refused before any work.
"""
import math
import shutil
import time

import numpy as np
import pytest

from data_shards.synthetic import make_synthetic_shards, render
from data_testing import ShardServer, metrics, sample_offsets, time_bound, tiny_config
from diti_fast.config import ConfigError
from diti_fast.data import DataError, DataWarning, eval_loader
from diti_fast.data.skip_stats import REASONS
from diti_fast.engine.loop import train

S, N, SEED = 16, 48, 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The set at /set/ (4 shards of 12) and copies at /cut/ and /stall/ whose shard 1 is cut after 5
    samples: the connection closes there (/cut/), or stays open with nothing more sent (/stall/)."""
    root = tmp_path_factory.mktemp("www")
    make_synthetic_shards(root / "set", N, image_size=S, seed=SEED, maxcount=12)
    shutil.copytree(root / "set", root / "cut")
    shutil.copytree(root / "set", root / "stall")
    cut = sample_offsets(root / "set" / "shard-000001.tar")["000000017"] + 100  # inside sample 17's header
    with ShardServer(root, drop={"/cut/shard-000001.tar": cut}, stall={"/stall/shard-000001.tar": cut}) as server:
        yield root, server


@pytest.fixture(scope="module")
def reference():
    images, attrs = render(range(N), S, seed=SEED)
    return images.transpose(0, 3, 1, 2), attrs


def _check_pass(loader, reference, expect):
    seen = []
    for b in loader:
        idx = b["index"].numpy()
        assert np.array_equal(b["image"].numpy(), reference[0][idx])
        assert np.array_equal(b["attrs"].numpy(), reference[1][idx])
        seen += idx.tolist()
    assert sorted(seen) == expect
    return loader.stats


def test_eval_pass_over_http_and_pipe(served, reference):
    root, server = served
    stats = _check_pass(eval_loader(f"{server.url}/set/manifest.json", batch_size=8, num_workers=2),
                        reference, list(range(N)))
    assert stats["skipped"] == 0
    assert all(server.hits[f"/set/shard-{i:06d}.tar"] >= 1 for i in range(4))
    # pipe:cat with a brace pattern: no manifest, so counts and label kinds come from one pass.
    pattern = f"pipe:cat {root}/set/shard-{{000000..000003}}.tar"
    stats = _check_pass(eval_loader(pattern, batch_size=8, rank=1, world_size=2), reference, list(range(24, 48)))
    assert stats["skipped"] == 0


def test_training_reads_http_and_pipe(served, tmp_path):
    root, server = served
    before = sum(v for k, v in server.hits.items() if k.startswith("/set/shard-"))
    res = train(tiny_config(tmp_path / "http", "stage=ddpm", f"data.shards={server.url}/set/manifest.json",
                            "run.max_images=12", "data.num_workers=1"))
    assert res.status == "done" and res.step == 3
    assert sum(v for k, v in server.hits.items() if k.startswith("/set/shard-")) > before
    last = metrics(tmp_path / "http")[-1]
    assert math.isfinite(last["loss"]) and last["data_skipped"] == {r: 0 for r in REASONS}
    pipe = f"pipe:cat {root}/set/shard-{{000000..000003}}.tar"
    res = train(tiny_config(tmp_path / "pipe", "stage=ddpm", f"data.shards={pipe}", "run.max_images=12"))
    assert res.status == "done" and res.step == 3
    assert math.isfinite(metrics(tmp_path / "pipe")[-1]["loss"])


def test_dropped_connection_costs_the_shard_tail(served, reference):
    root, server = served
    with pytest.warns(DataWarning, match=r"bad_shard=1\b"):
        stats = _check_pass(eval_loader(f"{server.url}/cut/manifest.json", batch_size=8), reference,
                            [i for i in range(N) if not 17 <= i < 24])
    assert stats["skipped_by_reason"] == {"bad_shard": 1}
    assert "cut/shard-000001.tar: the transfer ended early (partial file) (curl exit 18)" in stats["examples"][0]


def test_training_goes_on_with_exact_bad_shard_count(served, tmp_path):
    # One dropped shard, no manifest, data.num_samples given: every stream reads the shard from its
    # start, so each read yields samples 12..16 (5) and then fails. With a one-sample shuffle buffer a
    # stream that consumed P samples has started ceil(P/5) reads, all but the last counted bad.
    root, server = served
    steps, micro = 10, 8
    res = train(tiny_config(tmp_path, "stage=ddpm", f"data.shards={server.url}/cut/shard-000001.tar",
                            "data.num_samples=400", "data.shuffle_buffer=1", f"data.batch_size={micro}",
                            f"run.max_images={steps * micro}"))
    assert res.status == "done" and res.step == steps
    batches = [len(range(v, steps, 8)) for v in range(8)]  # 8 virtual streams take batches round-robin
    expected = sum((b * micro - 1) // 5 for b in batches if b)
    assert expected == 6 * 1 + 2 * 3
    assert metrics(tmp_path)[-1]["data_skipped"] == dict({r: 0 for r in REASONS}, bad_shard=expected)


@pytest.mark.parametrize("limit", [dict(stream_stall_s=1), dict(stream_timeout_s=2)])
def test_stalled_server_costs_the_shard_tail(served, reference, limit):
    # The server sends shard 1 up to sample 17's header, then nothing, keeping the connection open.
    # Either limit ends the download (curl exit 28): one bad_shard, the other samples all read.
    root, server = served
    started = time.monotonic()
    with time_bound(30, "a stalled download"), pytest.warns(DataWarning, match=r"bad_shard=1\b"):
        stats = _check_pass(eval_loader(f"{server.url}/stall/manifest.json", batch_size=8, **limit), reference,
                            [i for i in range(N) if not 17 <= i < 24])
    assert stats["skipped_by_reason"] == {"bad_shard": 1}
    assert "stall/shard-000001.tar: timed out" in stats["examples"][0] and "(curl exit 28)" in stats["examples"][0]
    assert time.monotonic() - started < 30


def test_training_goes_on_past_a_stalled_server(served, tmp_path):
    # As with the dropped connection below: every read of the stalled shard yields samples 12..16,
    # then waits out data.stream_timeout_s and counts once; 3 steps of 8 go to 3 streams, one stall each.
    # (The overall limit keeps this test short: curl judges a stall by a 5-second average speed.)
    root, server = served
    steps, micro = 3, 8
    with time_bound(60, "training past a stalled server"):
        res = train(tiny_config(tmp_path, "stage=ddpm", f"data.shards={server.url}/stall/shard-000001.tar",
                                "data.num_samples=400", "data.shuffle_buffer=1", f"data.batch_size={micro}",
                                "data.stream_timeout_s=2", f"run.max_images={steps * micro}"))
    assert res.status == "done" and res.step == steps
    assert metrics(tmp_path)[-1]["data_skipped"] == dict({r: 0 for r in REASONS}, bad_shard=3)


def test_without_curl_http_shards_are_refused_before_any_work(served, tmp_path, monkeypatch):
    root, server = served
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    for shards in (f"{server.url}/set/manifest.json", f"{server.url}/set/shard-{{000000..000001}}.tar"):
        with pytest.raises(DataError, match=r"needs the `curl` command, which is not on PATH; install the curl package"):
            eval_loader(shards, batch_size=4)
    with pytest.raises(ConfigError, match=r"data.shards=.*install the curl package"):
        train(tiny_config(tmp_path / "run", "stage=ddpm", f"data.shards={server.url}/set/manifest.json",
                          "run.max_images=4"))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_verify_command_reads_a_manifest_url(served, capsys):
    from data_shards.__main__ import main as shards_main
    root, server = served
    assert shards_main(["verify", f"{server.url}/set/manifest.json"]) == 0
    assert "4/4 shards OK" in capsys.readouterr().out
    assert shards_main(["verify", f"{server.url}/cut/manifest.json"]) == 1  # the dropped download
    err = capsys.readouterr().err
    assert f"{server.url}/cut/shard-000001.tar: cannot read (the transfer ended early (partial file) (curl exit 18))" in err


def test_404_is_an_error_naming_the_url(served, tmp_path):
    root, server = served
    url = f"{server.url}/nowhere/manifest.json"
    with pytest.raises(DataError, match=f"{url}: cannot read the shard manifest: .*HTTP error.*404"):
        eval_loader(url, batch_size=4)
    listed = f"{server.url}/set/shard-{{000000..000001}}.tar.missing"
    with pytest.raises(DataError, match=rf"{server.url}/set/shard-000000\.tar\.missing: .*HTTP error"):
        eval_loader(listed, batch_size=4)
    with pytest.raises(ConfigError, match=f"data.shards={url}: {url}: cannot read the shard manifest"):
        train(tiny_config(tmp_path, "stage=ddpm", f"data.shards={url}", "run.max_images=4"))


@pytest.mark.parametrize("name", ["../set/shard-000000.tar", "/etc/passwd", "http://elsewhere/x.tar", "a/../../b.tar",
                                  "pipe:cat /etc/passwd", "pipe:touch injected.tar"])
def test_manifest_names_stay_inside_its_location(served, tmp_path, name):
    import json

    from diti_fast.data import DataFormatError
    root, server = served
    manifest = json.loads((root / "set" / "manifest.json").read_text())
    manifest["shards"][2]["name"] = name
    for where in (root / "evil", tmp_path):
        where.mkdir(exist_ok=True)
        (where / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=r"shards\[2\]: shard name .* leaves the manifest's location"):
        eval_loader(f"{server.url}/evil/manifest.json", batch_size=4)
    with pytest.raises(DataFormatError, match=r"shards\[2\]: shard name .* leaves the manifest's location"):
        eval_loader(tmp_path / "manifest.json", batch_size=4)


def test_unknown_scheme_is_refused_before_reading():
    with pytest.raises(DataError, match=r"s3://bucket/x\.tar: no opener for scheme 's3'"):
        eval_loader("s3://bucket/x.tar", batch_size=4)
