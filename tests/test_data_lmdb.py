"""``python -m data_shards make --source lmdb``: LMDB files written the way Diff-AE's preparation
scripts write them (``length`` key, ``<res>-<zero-padded index>`` keys, encoded image bytes), with a
missing key and a corrupt value, into shards with labels, and on to ``eval probe``."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

lmdb = pytest.importorskip("lmdb")

from data_shards.__main__ import main as shards_main  # noqa: E402
from diti_fast.data import eval_loader  # noqa: E402
from diti_fast.weights import export_path  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "manip_tiny"
NAMES = ["Smiling", "Male", "Young"]
SPLIT = (24, 8, 8)  # train, valid, test: a small CelebA with the same offsets rule
MISSING, CORRUPT = 3, 26  # a train index without a key, a valid index whose value is not an image


def _face(i: int, w: int = 178, h: int = 218) -> Image.Image:
    """A CelebA-sized image whose content differs per index (a gradient plus a bright square)."""
    rng = np.random.default_rng(i)
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = rng.integers(0, 256, 3, dtype=np.uint8)
    img[:, :, 0] = (np.arange(w) * (i + 1) % 256).astype(np.uint8)
    y, x = 57 + (i * 7) % 100, 25 + (i * 11) % 100
    img[y:y + 20, x:x + 20] = 255
    return Image.fromarray(img)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the test compares pixels
    return buf.getvalue()


def _write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


@pytest.fixture(scope="module")
def celeba_lmdb(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdb")
    n = sum(SPLIT)
    rng = np.random.default_rng(1)
    signs = np.where(rng.random((n, len(NAMES))) < 0.5, -1, 1)
    signs[-8:, :] = np.array([[1, -1, 1], [-1, 1, -1]] * 4)  # both classes of every attribute in test
    items = {b"length": str(n).encode()}
    for i in range(n):
        if i == MISSING:
            continue
        items[f"None-{i:07d}".encode()] = b"\xff\xd8 not an image" if i == CORRUPT else _png(_face(i))
    _write_lmdb(root / "celeba64.lmdb", items)
    lines = [str(n), " ".join(NAMES)] + [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in row)
                                          for i, row in enumerate(signs)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root, signs


def _make(root: Path, out: Path, *extra: str) -> int:
    return shards_main(["make", "--source", "lmdb", "--root", str(root / "celeba64.lmdb"), "--size", "32",
                        "--out", str(out), "--workers", "1", "--no-progress", "--maxcount", "10",
                        "--attrs", str(root / "list_attr_celeba.txt"), "--split-sizes", ",".join(map(str, SPLIT)),
                        *extra])


def _by_index(shards: Path, size: int = 32) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    out = {}
    for b in eval_loader(str(shards), batch_size=8, image_size=size):
        attrs = b["attrs"] if b["attrs"] is not None else [None] * len(b["index"])
        for i, img, a in zip(b["index"].tolist(), b["image"], attrs):
            out[i] = (img.numpy(), None if a is None else a.numpy())
    return out


def test_celeba64_lmdb_to_labelled_shards_and_probe(celeba_lmdb, tmp_path, capsys):
    root, signs = celeba_lmdb
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert _make(root, out) == 0
    printed = capsys.readouterr().out
    assert "None-0000003 (missing key" in printed and "None-0000026 (corrupt value" in printed

    ranges = {"train": range(0, 24), "valid": range(24, 32), "test": range(32, 40)}
    for split, r in ranges.items():
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert [a["name"] for a in manifest["attributes"]] == NAMES
        bad = {MISSING: "missing key", CORRUPT: "corrupt value"}
        expect_skipped = [(i, f"None-{i:07d}", bad[i]) for i in bad if i in r]
        assert [(s["index"], s["src"], s["reason"].split(":")[0].split(" (")[0])
                for s in manifest["skipped_sources"]] == expect_skipped
        assert manifest["num_skipped_sources"] == len(expect_skipped)
        assert manifest["num_samples"] == len(r) - len(expect_skipped)
        got = _by_index(out / split)
        assert sorted(got) == [i for i in r if i not in bad]
        for i, (img, attrs) in got.items():
            # Labels: row i of the attribute file (-1 -> 0, 1 -> 1); pixels: the original's crop and
            # torchvision-style bilinear resize, done here with PIL alone.
            np.testing.assert_array_equal(attrs, (signs[i] == 1).astype(np.float32))
            ref = _face(i).crop((25, 57, 153, 185)).resize((32, 32), Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(img, np.asarray(ref).transpose(2, 0, 1))

    from diti_fast.eval.commands import main as eval_main
    run = tmp_path / "run"
    export_path(run).parent.mkdir(parents=True)
    shutil.copy(export_path(FIXTURE), export_path(run))
    result = tmp_path / "probe.json"
    assert eval_main(["probe", "--run", str(run), "--data", str(out / "train"), "--val-data", str(out / "valid"),
                      "--test-data", str(out / "test"), "--epochs", "2", "--device", "cpu",
                      "--out", str(result)]) == 0
    probe = json.loads(result.read_text())
    assert [a["name"] for a in probe["test"]] == NAMES
    for a, col in zip(probe["test"], signs[32:40].T):  # the test split's base rates are the file's
        assert a["kind"] == "binary" and a["base_rate"] == pytest.approx(float((col == 1).mean()))


@pytest.mark.parametrize("layout, digits", [("ffhq", 5), ("bedroom", 7)])
def test_ffhq_and_bedroom_layouts(tmp_path, layout, digits):
    imgs = {i: Image.fromarray(np.full((40, 48, 3), 20 * i, np.uint8)) for i in range(4)}
    _write_lmdb(tmp_path / "db", {b"length": b"4", **{f"256-{i:0{digits}d}".encode(): _png(m)
                                                      for i, m in imgs.items()}})
    out = tmp_path / "out"
    assert shards_main(["make", "--source", "lmdb", "--root", str(tmp_path / "db"), "--size", "16", "--out",
                        str(out), "--workers", "1", "--no-progress"]) == 0  # layout auto-detected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["layout"] == layout and manifest["num_samples"] == 4
    got = _by_index(out, 16)
    assert sorted(got) == [0, 1, 2, 3]
    assert all(int(img.mean()) == 20 * i for i, (img, _) in got.items())


def test_bad_input_is_refused_before_any_shard(celeba_lmdb, tmp_path, capsys):
    root, _ = celeba_lmdb
    # Split sizes beyond the 'length' key: named, nothing written.
    assert shards_main(["make", "--source", "lmdb", "--root", str(root / "celeba64.lmdb"), "--size", "32",
                        "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "202600 images but the 'length' key says 40" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # No length key; an attribute file with too few rows (file and line named).
    _write_lmdb(tmp_path / "nolen", {b"256-00000": _png(_face(0))})
    assert shards_main(["make", "--source", "lmdb", "--root", str(tmp_path / "nolen"), "--out",
                        str(tmp_path / "b"), "--no-progress"]) == 2
    assert "no 'length' key" in capsys.readouterr().err
    short = tmp_path / "attrs.txt"
    short.write_text("1\nSmiling\n000001.jpg 1\n")
    assert shards_main(["make", "--source", "lmdb", "--root", str(root / "celeba64.lmdb"), "--attrs", str(short),
                        "--split-sizes", "24,8,8", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert f"{short}:1: 1 attribute rows for the 40 images" in capsys.readouterr().err
