"""Shards made by another tool (webdataset.ShardWriter, its own encoders): JPEG/PNG/WebP images of
mixed sizes with .json or .cls labels, no manifest. They are read (resized on load or refused as
configured), trained on (ddpm, then DiTi) and probed end to end."""
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_testing import metrics, tiny_config
from diti_fast.config import ConfigError
from diti_fast.data import DataError, ShardSpec, eval_loader
from diti_fast.engine.loop import train

SHAPES = ["circle", "square", "triangle"]
SIZES = [(48, 40), (32, 32), (70, 64), (20, 24)]  # (w, h): larger, exact, larger, smaller than 32
FORMATS = ["jpg", "png", "webp"]


def _image(i):
    rng = np.random.default_rng(i)
    w, h = SIZES[i % len(SIZES)]
    return (rng.random((h, w, 3)) * 80 + (i % 3) * 60).astype(np.uint8)


def _member(i):
    """jpg/png through ShardWriter's own encoders; it has none for webp, so PIL's bytes for those."""
    fmt = FORMATS[i % 3]
    if fmt != "webp":
        return fmt, _image(i)
    buf = io.BytesIO()
    Image.fromarray(_image(i)).save(buf, format="WEBP", quality=90)
    return fmt, buf.getvalue()


def _members(root, glob):
    out = {}
    for path in sorted(root.glob(glob)):
        with tarfile.open(path) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if ext in FORMATS:
                    out[key] = tf.extractfile(m).read()
    return out


def _reference(data, size=32):
    """PIL directly: decode, central square, bicubic resize (antialiased), CHW."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    pattern = str(root / "json-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=12, verbose=0) as sink:
        for i in range(36):
            sink.write({"__key__": f"img{i:04d}", **dict([_member(i)]),
                        "json": {"shape": SHAPES[i % 3], "big": bool(i % 2), "brightness": float(i % 3) * 0.5}})
    with wds.ShardWriter(str(root / "cls-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(20):
            sink.write({"__key__": f"c{i:04d}", **dict([_member(i)]), "cls": i % 4})
    return root


def test_reads_mixed_formats_sizes_and_json_labels(foreign):
    pattern = str(foreign / "json-{000000..000002}.tar")
    spec = ShardSpec.resolve(pattern).reading(image_size=32)
    ev = eval_loader(spec, batch_size=5)
    batches = list(ev)
    got = {k: (img.numpy(), a.numpy()) for b in batches for k, img, a in zip(b["key"], b["image"], b["attrs"])}
    assert ev.stats["skipped"] == 0 and len(got) == 36
    # Keys that are not our indices: index is the storage position (ShardWriter keeps write order).
    assert [int(i) for b in batches for i in b["index"]] == list(range(36))
    assert [k for b in batches for k in b["key"]] == [f"img{i:04d}" for i in range(36)]
    # json keys became attributes, kinds and classes read from the values (strings: sorted classes).
    assert ev.dataset.spec.attributes == [
        {"name": "shape", "kind": "categorical", "num_classes": 3, "classes": SHAPES},
        {"name": "big", "kind": "binary"}, {"name": "brightness", "kind": "continuous"}]
    stored = _members(foreign, "json-*.tar")
    for i in range(36):
        img, attrs = got[f"img{i:04d}"]
        assert attrs.tolist() == [i % 3, i % 2, (i % 3) * 0.5]
        assert np.array_equal(img, _reference(stored[f"img{i:04d}"]))
    # Refused instead of resized, as configured: skipped and counted, or an error naming the sample.
    with pytest.warns(UserWarning):
        skipped = eval_loader(pattern, batch_size=6, size_mismatch="skip", image_size=32)
        n = sum(len(b["index"]) for b in skipped)
    assert n == 9 and skipped.stats["skipped_by_reason"] == {"size": 27}  # only the 32x32 ones stay
    with pytest.raises(DataError, match=r"json-000000\.tar: sample img0000: image is 48x40, expected 32x32 "
                                        r"\(data\.size_mismatch=error"):
        list(eval_loader(pattern, batch_size=6, size_mismatch="error", image_size=32))


def test_cls_labels_are_one_categorical_attribute(foreign):
    ev = eval_loader(str(foreign / "cls-{000000..000001}.tar"), batch_size=8, image_size=32)
    labels = {k: int(a[0]) for b in ev for k, a in zip(b["key"], b["attrs"])}
    assert ev.dataset.spec.attributes == [{"name": "cls", "kind": "categorical", "num_classes": 4}]
    assert labels == {f"c{i:04d}": i % 4 for i in range(20)}


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of the precision at each positive, ranked by score (no ties in float scores here)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def test_trains_and_probes_end_to_end(foreign, tmp_path, capsys, monkeypatch):
    from diti_fast.eval import probe as probe_mod
    from diti_fast.eval.commands import main as eval_main
    seen = {}
    real = probe_mod.train_probe

    def spy(train_set, val_set, test_set, specs, cfg):
        seen["test"] = test_set
        seen["result"] = real(train_set, val_set, test_set, specs, cfg)
        return seen["result"]
    monkeypatch.setattr(probe_mod, "train_probe", spy)

    pattern = str(foreign / "json-{000000..000002}.tar")
    ddpm = train(tiny_config(tmp_path / "ddpm", "stage=ddpm", f"data.shards={pattern}", "data.image_size=32",
                             "run.max_images=8"))
    assert ddpm.status == "done"
    diti = train(tiny_config(tmp_path / "diti", f"init.ddpm={ddpm.export}", f"data.shards={pattern}",
                             "run.max_images=12", "data.num_workers=1"))
    assert diti.status == "done" and diti.step == 3
    rows = metrics(tmp_path / "diti")
    assert all(np.isfinite(r["loss"]) for r in rows) and sum(rows[-1]["data_skipped"].values()) == 0
    out = tmp_path / "probe.json"
    # The whole set as the test split too (its own 10 % would be 3 samples): every metric below is then
    # computed over 36 samples, 12 of each shape and 18 big ones.
    assert eval_main(["probe", "--run", str(tmp_path / "diti"), "--data", pattern, "--test-data", pattern,
                      "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    probe = json.loads(out.read_text())
    assert [a["name"] for a in probe["test"]] == ["shape", "big", "brightness"]
    shape, big, bright = probe["test"]
    assert (shape["kind"], big["kind"], bright["kind"]) == ("categorical", "binary", "continuous")
    # The reported test metrics against the probe's own test outputs (columns: 3 shape logits, the
    # big logit, brightness), recomputed here from their definitions.
    y = seen["test"][1]
    scores = seen["result"].test_scores
    n = probe["n_test"]
    assert n == len(y) == len(scores) == 36
    # the labels are the shards' (brightness = shape / 2 and big in {0, 1} by construction)
    assert np.array_equal(y[:, 2], y[:, 0] * 0.5) and set(np.unique(y[:, 1])) <= {0.0, 1.0}
    cls = y[:, 0].astype(int)
    assert shape["accuracy"] == pytest.approx(np.mean(scores[:, 0:3].argmax(1) == cls), abs=1e-12)
    assert shape["majority_rate"] == pytest.approx(np.bincount(cls, minlength=3).max() / n, abs=1e-12)
    assert big["ap"] == pytest.approx(_average_precision(y[:, 1], scores[:, 3]), abs=1e-9)
    assert bright["pearson_r"] == pytest.approx(np.corrcoef(scores[:, 4], y[:, 2])[0, 1], abs=1e-6)


def test_size_mismatch_error_is_a_config_error_before_work(foreign, tmp_path):
    pattern = str(foreign / "json-{000000..000002}.tar")
    with pytest.raises(ConfigError, match=r"holds 40x40 images but the model takes 32x32.*size_mismatch='error'"):
        train(tiny_config(tmp_path, "stage=ddpm", f"data.shards={pattern}", "data.image_size=32",
                          "data.size_mismatch=error", "run.max_images=4"))
