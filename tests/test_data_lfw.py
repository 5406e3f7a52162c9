"""The LFW regression recipe: lfw_attributes.txt (LFW's own format) -> the folder source's attribute
CSV -> shards with continuous attributes, the original's train/test split by LFW's people files."""
import json

import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import main as shards_main
from data_shards.csvattrs import read_attribute_csv

NAMES = ["Male", "Asian", "Black Hair", "Mouth Slightly Open"]  # names with spaces, as in the real file
ROWS = [("Aaron Eckhart", 1, [1.568346, -1.889130, 0.5, -0.25]),
        ("Aaron Peirsol", 1, [0.169851, -0.982408, -1.0, 2.125]),
        ("Aaron Peirsol", 2, [0.0, 1.0e-3, 3.5, -4.0]),
        ("Zico", 3, [-0.75, 0.125, 2.0, 1.5])]


def _lfw_txt(path, rows=ROWS, count=None):
    lines = [f"# {len(rows) if count is None else count}", "#\t" + "\t".join(["person", "imagenum", *NAMES])]
    lines += ["\t".join([p, str(n), *(f"{v:f}" for v in vals)]) for p, n, vals in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lfw_attributes_to_csv_to_shards(tmp_path, capsys):
    src = _lfw_txt(tmp_path / "lfw_attributes.txt")
    (tmp_path / "peopleDevTrain.txt").write_text("2\nAaron Eckhart\t1\nAaron Peirsol\t2\n")
    assert shards_main(["lfw-attrs", str(src), "--out", str(tmp_path / "all.csv")]) == 0
    assert shards_main(["lfw-attrs", str(src), "--out", str(tmp_path / "train.csv"),
                        "--people", str(tmp_path / "peopleDevTrain.txt")]) == 0
    assert "3 images x 4 continuous attributes (1 of other persons left out)" in capsys.readouterr().out
    specs, table, _ = read_attribute_csv(tmp_path / "all.csv")  # the reader `make --attrs` uses
    assert specs == [{"name": n, "kind": "continuous"} for n in NAMES]
    want = {f"{p.replace(' ', '_')}/{p.replace(' ', '_')}_{n:04d}.jpg": v for p, n, v in ROWS}
    assert sorted(table) == sorted(want) and "Aaron_Peirsol/Aaron_Peirsol_0002.jpg" in table
    for path, vals in want.items():
        np.testing.assert_allclose(table[path], vals, rtol=1e-6)
    _, train, _ = read_attribute_csv(tmp_path / "train.csv")
    assert sorted(train) == sorted(p for p in want if not p.startswith("Zico"))

    root = tmp_path / "lfw_funneled"  # images where LFW's funneled folder has them (250x250)
    for k, path in enumerate(want):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((250, 250, 3), 40 * k, np.uint8)).save(root / path)
    assert shards_main(["make", "--source", "folder", "--root", str(root), "--attrs", str(tmp_path / "all.csv"),
                        "--size", "16", "--crop", "resize-center", "--out", str(tmp_path / "lfw16"),
                        "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "lfw16" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and [a["kind"] for a in manifest["attributes"]] == ["continuous"] * 4


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[:3], "the count line says 4 images, the file lists 3"),
    (lambda rows: rows + [("Aaron Eckhart", 1, [0, 0, 0, 0])], "'Aaron Eckhart' image 1 already on line 3"),
    (lambda rows: rows[:1] + [("Bad", "x", [0, 0, 0, 0])] + rows[2:], ":4: imagenum 'x' is not an integer"),
])
def test_bad_lfw_files_name_the_line(tmp_path, capsys, mutate, message):
    src = _lfw_txt(tmp_path / "a.txt", mutate(list(ROWS)), count=4)
    assert shards_main(["lfw-attrs", str(src), "--out", str(tmp_path / "a.csv")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists()
