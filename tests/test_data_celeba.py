"""CelebA's official layout, built here in miniature: parsing, crop+resize, splits, errors."""

import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import main
from diti_fast.data import eval_loader, read_manifest

NAMES = [f"Attr_{i:02d}" for i in range(40)]
SIZE = 16


@pytest.fixture
def celeba(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(1)
    n = 9
    split_of = [0, 0, 1, 0, 2, 0, 1, 2, 0]
    values = rng.choice([-1, 1], size=(n, 40))
    for i in range(n):
        arr = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)  # official aligned size, H×W
        Image.fromarray(arr).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=90)
    lines = [str(n), " ".join(NAMES)]
    for i in range(n):
        # The official file pads with double spaces; the parser must not care.
        lines.append(f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in values[i]))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {s}\n" for i, s in enumerate(split_of)))
    return root, values, split_of


def _reference(path):
    img = Image.open(path).convert("RGB").crop((25, 57, 25 + 128, 57 + 128))  # top 57, left 25, 128×128
    # bilinear: the celeba source's default, as the original's torchvision Resize on PIL images
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def test_celeba_splits_pixels_and_attributes(celeba, tmp_path):
    root, values, split_of = celeba
    out = tmp_path / "out"
    assert main(["make", "--source", "celeba", "--root", str(root), "--out", str(out), "--size", str(SIZE),
                 "--maxcount", "2", "--workers", "2", "--no-progress"]) == 0
    for code, split in enumerate(("train", "valid", "test")):
        m = read_manifest(out / split)
        expect = [i for i, s in enumerate(split_of) if s == code]
        assert m["split"] == split and m["num_samples"] == len(expect)
        assert [a["name"] for a in m["attributes"]] == NAMES
        assert all(a["kind"] == "binary" for a in m["attributes"])
        seen = []
        for batch in eval_loader(out / split, batch_size=3):
            for j, idx in enumerate(batch["index"].tolist()):
                seen.append(idx)
                ref = _reference(root / "img_align_celeba" / f"{idx + 1:06d}.jpg")
                assert np.array_equal(batch["image"][j].numpy(), ref)
                assert batch["attrs"][j].tolist() == ((values[idx] + 1) // 2).tolist()
        assert sorted(seen) == expect  # index = file number - 1


def test_single_split_and_rerun(celeba, tmp_path):
    root, _, split_of = celeba
    out = tmp_path / "out"
    args = ["make", "--source", "celeba", "--root", str(root), "--out", str(out), "--size", str(SIZE),
            "--split", "valid", "--workers", "1", "--no-progress"]
    assert main(args) == 0 and main(args) == 2  # the second would replace the first: refused
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["valid"]
    assert read_manifest(out / "valid")["num_samples"] == split_of.count(1)
    with pytest.raises(FileNotFoundError, match="holds shard sets valid"):
        read_manifest(out)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: (r / "list_attr_celeba.txt").unlink(), "list_attr_celeba.txt: not found"),
        (lambda r: (r / "list_eval_partition.txt").unlink(), "list_eval_partition.txt: not found"),
        (lambda r: _edit(r / "list_attr_celeba.txt", 4, lambda l: l.rsplit(" ", 1)[0]),
         "list_attr_celeba.txt:5: expected a file name and 40 values, got 40 fields"),
        (lambda r: _edit(r / "list_attr_celeba.txt", 2, lambda l: l[:-2] + " 7"),
         "list_attr_celeba.txt:3: attribute 'Attr_39': '7' is not -1 or 1"),
        (lambda r: _edit(r / "list_attr_celeba.txt", 0, lambda l: "12"),
         "list_attr_celeba.txt:1: header says 12 images, file lists 9"),
        (lambda r: _edit(r / "list_eval_partition.txt", 3, lambda l: l.replace(" 0", " 5")),
         "list_eval_partition.txt:4: expected '<file> <0|1|2>'"),
    ],
)
def test_bad_layout_errors_name_file_and_line(celeba, tmp_path, capsys, mutate, expected):
    root, _, _ = celeba
    mutate(root)
    rc = main(["make", "--source", "celeba", "--root", str(root), "--out", str(tmp_path / "o"),
               "--size", str(SIZE), "--no-progress"])
    assert rc == 2
    assert expected in capsys.readouterr().err


def _edit(path, line_no, fn):
    lines = path.read_text().splitlines()
    lines[line_no] = fn(lines[line_no])
    path.write_text("\n".join(lines) + "\n")


def test_missing_image_is_skipped_and_counted(celeba, tmp_path):
    root, _, split_of = celeba
    (root / "img_align_celeba" / "000001.jpg").unlink()
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match="000001.jpg"):
        assert main(["make", "--source", "celeba", "--root", str(root), "--out", str(out), "--size", str(SIZE),
                     "--split", "train", "--workers", "1", "--no-progress"]) == 0
    assert read_manifest(out / "train")["num_samples"] == split_of.count(0) - 1
