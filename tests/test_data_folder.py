"""folder source → shards → loader round trip, the CLI, idempotent re-runs and bad input."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import build_parser, main
from diti_fast.data import DataWarning, eval_loader, read_manifest

SIZE = 16


def _reference(path, size=SIZE):
    """The spec, written with PIL directly: RGB, central square crop, bicubic resize."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    files = []
    specs = [("a/x1.png", (40, 30), "RGB"), ("a/x2.jpg", (25, 25), "RGB"), ("b/c/y.png", (33, 50), "RGBA"),
             ("b/z.png", (20, 20), "L"), ("top.bmp", (64, 48), "RGB"), ("b/c/w.webp", (30, 31), "RGB")]
    for rel, (w, h, ), mode in specs:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if bands == 1 else arr, mode).save(p)
        files.append(rel)
    (root / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    csv_path = tmp_path / "attrs.csv"
    rows = [["path", "smiling", "hair", "age:continuous", "group"]]
    for i, rel in enumerate(sorted(files)):
        rows.append([rel, str(i % 2), ["black", "blond", "brown"][i % 3], f"{20 + 1.5 * i}", str(i % 4)])
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root, csv_path, sorted(files), rows


def _make(*args):
    return main(["make", "--no-progress", *map(str, args)])


def _all(out, **kw):
    batches = list(eval_loader(out, batch_size=4, **kw))
    return {int(i): (b["image"][j].numpy(), None if b["attrs"] is None else b["attrs"][j].numpy())
            for b in batches for j, i in enumerate(b["index"])}


@pytest.mark.parametrize("fmt", ["u8", "png"])
def test_round_trip_pixels_and_attributes(tree, tmp_path, fmt):
    root, csv_path, files, rows = tree
    out = tmp_path / "shards"
    assert _make("--source", "folder", "--root", root, "--attrs", csv_path, "--out", out, "--size", SIZE,
                 "--maxcount", 4, "--workers", 2, "--format", fmt) == 0
    m = read_manifest(out)
    assert m["num_samples"] == len(files) and m["image_size"] == SIZE and m["image_format"] == fmt
    assert [(a["name"], a["kind"]) for a in m["attributes"]] == [
        ("smiling", "binary"), ("hair", "categorical"), ("age", "continuous"), ("group", "categorical")]
    assert m["attributes"][1]["classes"] == ["black", "blond", "brown"]
    assert m["attributes"][3]["num_classes"] == 4
    for s in m["shards"]:
        assert hashlib.sha256(open(s["path"], "rb").read()).hexdigest() == s["sha256"]
    got = _all(out)
    assert sorted(got) == list(range(len(files)))  # index = position in sorted path order
    for i, rel in enumerate(files):
        image, attrs = got[i]
        assert np.array_equal(image, _reference(root / rel)), rel
        row = rows[1 + i]
        hair = ["black", "blond", "brown"].index(row[2])
        assert attrs.tolist() == pytest.approx([int(row[1]), hair, float(row[3]), int(row[4])])


def test_jpeg_storage_is_close(tree, tmp_path):
    root, _, files, _ = tree
    out = tmp_path / "jpg"
    assert _make("--source", "ffhq", "--root", root, "--out", out, "--size", SIZE, "--format", "jpg",
                 "--quality", 98, "--workers", 1) == 0
    got = _all(out)
    assert got[0][1] is None  # no attributes without a CSV
    for i, rel in enumerate(files):
        err = got[i][0].astype(float) - _reference(root / rel)
        assert np.sqrt((err ** 2).mean()) < 6  # q98 on noise images: ~2 grey levels RMS


def test_rerun_is_idempotent_and_replans(tree, tmp_path):
    root, csv_path, files, _ = tree
    out = tmp_path / "out"
    args = ["--source", "folder", "--root", root, "--out", out, "--size", SIZE, "--workers", 1]
    assert _make(*args, "--maxcount", 2) == 0
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert _make(*args, "--maxcount", 2, "--overwrite") == 0
    again = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert again == first  # nothing rewritten, nothing added
    # A different plan into the same directory: old shards go, samples are not duplicated.
    assert _make(*args, "--maxcount", 4, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    got = list(eval_loader(out, batch_size=100))
    idx = sorted(int(i) for b in got for i in b["index"])
    assert idx == list(range(len(files)))
    # An interrupted earlier run (shards staged beside, no manifest) is cleaned up.
    from data_shards.writer import staging_dir
    staging_dir(out).mkdir()
    (staging_dir(out) / "shard-000007.tar").write_bytes(b"partial")
    assert _make(*args, "--maxcount", 4, "--overwrite") == 0
    assert not staging_dir(out).exists() and not (out / "shard-000007.tar").exists()
    assert read_manifest(out)["num_samples"] == len(files)


def test_unrelated_output_dir_is_refused(tree, tmp_path, capsys):
    root, _, _, _ = tree
    out = tmp_path / "busy"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    assert _make("--source", "folder", "--root", root, "--out", out, "--size", SIZE) == 2
    err = capsys.readouterr().err
    assert "holiday.jpg" in err and "unrelated" in err
    assert sorted(os.listdir(out)) == ["holiday.jpg"]
    # A manifest from something else is not ours either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert _make("--source", "folder", "--root", root, "--out", other, "--size", SIZE) == 2


def test_corrupt_source_image_skipped_and_counted(tree, tmp_path):
    root, _, files, _ = tree
    data = (root / "a/x2.jpg").read_bytes()
    (root / "a/x2.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    with pytest.warns(DataWarning, match=r"skipped 1 unreadable source image.*a/x2\.jpg"):
        assert _make("--source", "folder", "--root", root, "--out", out, "--size", SIZE, "--workers", 1) == 0
    m = read_manifest(out)
    assert m["num_samples"] == len(files) - 1 and m["num_skipped_sources"] == 1
    assert m["skipped_sources"][0]["src"] == "a/x2.jpg"
    assert _make("--source", "folder", "--root", root, "--out", tmp_path / "strict", "--size", SIZE,
                 "--workers", 1, "--strict") == 2


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_csv_errors_name_file_and_line(tree, tmp_path, capsys):
    root, _, files, _ = tree
    out = tmp_path / "o"
    missing = tmp_path / "nope.csv"
    assert _make("--source", "folder", "--root", root, "--attrs", missing, "--out", out) == 2
    assert f"{missing}: attribute file not found" in capsys.readouterr().err

    cases = {
        "cols": (f"path,a,b\n{files[0]},1,2\n{files[1]},1\n", ":3: expected 3 columns"),
        "binary": (f"path,a:binary\n{files[0]},1\n{files[1]},maybe\n", ":3: attribute 'a': 'maybe' is not binary"),
        "number": (f"path,a:continuous\n{files[0]},1.5\n{files[1]},abc\n",
                   ":3: attribute 'a': 'abc' is not a finite number"),
        "dup": (f"path,a\n{files[0]},1\n{files[0]},0\n", ":3: duplicate path"),
        "kind": ("path,a:weird\n", ":1: attribute 'a' has unknown kind"),
    }
    for name, (text, expected) in cases.items():
        path = _write_csv(tmp_path / f"{name}.csv", text)
        assert _make("--source", "folder", "--root", root, "--attrs", path, "--out", out) == 2, name
        err = capsys.readouterr().err
        assert f"{path}{expected}" in err, (name, err)


def test_csv_rows_and_images_that_do_not_match(tree, tmp_path, capsys):
    root, _, files, _ = tree
    # files[0..2] have rows; files[3..5] do not; two rows name no image (lines 3 and 5).
    text = (f"path,a\n{files[0]},1\nghost.png,0\n{files[1]},0\nsub/gone.jpg,1\n{files[2]},1\n")
    path = _write_csv(tmp_path / "partial.csv", text)
    out = tmp_path / "o"
    with pytest.warns(DataWarning) as record:
        assert _make("--source", "folder", "--root", root, "--attrs", path, "--out", out, "--size", SIZE) == 0
    msg = " ".join(str(w.message) for w in record)
    assert "2 row(s) name no image" in msg and "line 3 'ghost.png'" in msg and "line 5 'sub/gone.jpg'" in msg
    assert "3 image(s) have no row" in msg and repr(files[3]) in msg
    m = read_manifest(out)
    assert m["num_samples"] == 3
    assert m["attrs_unmatched"] == {"rows_without_image": 2, "first_rows_without_image": ["ghost.png", "sub/gone.jpg"],
                                    "images_without_row": 3, "first_images_without_row": files[3:]}
    # --strict: the same mismatch is an error naming the CSV line; images without rows alone, too.
    assert _make("--source", "folder", "--root", root, "--attrs", path, "--out", tmp_path / "s", "--strict") == 2
    assert f"{path}:3: image 'ghost.png' not found" in capsys.readouterr().err
    rows_only = _write_csv(tmp_path / "rows.csv", f"path,a\n{files[0]},1\n")
    assert _make("--source", "folder", "--root", root, "--attrs", rows_only, "--out", tmp_path / "s", "--strict") == 2
    assert f"{files[1]}: no row in {rows_only} (5 image(s) without a row; --strict)" in capsys.readouterr().err


def test_writers_emit_cls_or_json_labels(tree, tmp_path):
    import tarfile
    root, csv_path, files, rows = tree
    out = tmp_path / "j"
    assert _make("--source", "folder", "--root", root, "--attrs", csv_path, "--out", out, "--size", SIZE,
                 "--no-shuffle") == 0
    with tarfile.open(out / "shard-000000.tar") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf}
    assert json.loads(got["000000000.json"]) == {"smiling": 0, "hair": "black", "age": 20.0, "group": 0}
    assert json.loads(got["000000004.json"]) == {"smiling": 0, "hair": "blond", "age": 26.0, "group": 0}
    one = _write_csv(tmp_path / "one.csv", "path,kind:categorical\n" + "".join(f"{f},{i % 3}\n" for i, f in enumerate(files)))
    assert _make("--source", "folder", "--root", root, "--attrs", one, "--out", tmp_path / "c", "--size", SIZE,
                 "--no-shuffle") == 0
    with tarfile.open(tmp_path / "c" / "shard-000000.tar") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf}
    assert [got[f"{i:09d}.cls"] for i in range(6)] == [b"0", b"1", b"2", b"0", b"1", b"2"]
    assert not any(n.endswith(".json") for n in got)


def test_help_documents_every_option():
    parser = build_parser()
    make = parser._subparsers._group_actions[0].choices["make"]
    for action in make._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    text = make.format_help()
    for opt in ("--source", "--out", "--size", "--image-size", "--maxcount", "--format", "--workers", "--attrs",
                "--split", "--num", "--seed", "--strict", "--verify"):
        assert opt in text


def test_verify_command(tmp_path, capsys):
    from data_shards.synthetic import make_synthetic_shards

    make_synthetic_shards(tmp_path, 30, image_size=8, maxcount=10)
    assert main(["verify", str(tmp_path)]) == 0
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path)]) == 1
    assert "shard-000001.tar: checksum mismatch (sha256 " in capsys.readouterr().err
