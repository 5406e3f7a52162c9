"""Loading a run for evaluation, reading images from shards, and the cached frozen-encoder features.

Features are extracted once per (export file, shard set, sample cap) and cached under
``RUN/eval/features/``: probes, per-chunk attribution and the report all read the same arrays, so a probe
sweep over 16 chunk groups costs one pass of the encoder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..weights import CheckpointError, EXPORT_NAME, Exported, export_path, load_export
from ..data import ShardSpec, eval_loader, to_model_input


class EvalError(ValueError):
    """An evaluation input (run directory, data, option) is missing or does not fit."""


def resolve_export(run: str | Path) -> Path:
    """RUN directory or an export file -> the safetensors path, with an error that says what was expected."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.exists():
        raise EvalError(f"run {p} does not exist")
    f = export_path(p)
    if not f.is_file():
        raise EvalError(f"{p} holds no exported weights: expected {f} "
                        f"(written at the end of training; pass a run directory or an {EXPORT_NAME} file)")
    return f


def load_run(run: str | Path, device="cpu", stage: str | None = "diti") -> Exported:
    """Load an export and check its stage. Weight mismatches surface as CheckpointError naming the keys."""
    path = resolve_export(run)
    ex = load_export(path, device=device)
    if stage is not None and ex.stage != stage:
        hint = (" (a DDPM has no encoder: point --run at the DiTi run trained on top of it)"
                if ex.stage == "ddpm" else "")
        raise EvalError(f"{path} holds a {ex.stage!r} export, this command needs a {stage!r} one{hint}")
    return ex


def run_dir_of(run: str | Path) -> Path:
    """Where evaluation outputs go: the run directory (the export file's grandparent for a file)."""
    p = Path(run)
    if p.is_file():
        return p.parent.parent if p.parent.name == "export" else p.parent
    return p


# --------------------------------------------------------------------------- data

_COUNTED: dict = {}  # manifest-less sets already counted in this process (a full pass each time otherwise)


def shard_spec(shards: str | Path):
    """Image size, attributes and counts of a shard set (a manifest directory or URL, a pattern or
    a list of paths/URLs; see docs/data.md)."""
    key = repr(shards)
    if key in _COUNTED:
        return _COUNTED[key]
    spec = ShardSpec.resolve(str(shards) if isinstance(shards, Path) else shards).with_counts()
    if spec.manifest is None:
        _COUNTED[key] = spec
    return spec


def iter_batches(shards: str | Path, batch_size: int = 256, num_workers: int = 0, image_size: int | None = None):
    """The shard set's ordered evaluation pass (no augmentation), as (positions, uint8 images, attrs),
    images at ``image_size`` (default: the set's own; others are center-cropped and resized on load).

    A position is the sample's number in storage order (the loader's ``index``), so it stays the same
    when the loader skips a corrupt sample."""
    n = 0
    loader = eval_loader(shard_spec(shards).reading(image_size=image_size), batch_size=batch_size,
                         num_workers=num_workers)
    for batch in loader:
        imgs = batch["image"]
        idx = batch.get("index")
        pos = (np.asarray(idx, dtype=np.int64) if idx is not None else np.arange(n, n + len(imgs), dtype=np.int64))
        attrs = batch.get("attrs")
        attrs = (np.asarray(attrs, dtype=np.float32) if attrs is not None
                 else np.zeros((len(imgs), 0), np.float32))
        n += len(imgs)
        yield pos, imgs, attrs


def _model_input(images: torch.Tensor, device) -> torch.Tensor:
    return to_model_input(images, device)


def load_images(shards: str | Path, positions: list[int], device="cpu", batch_size: int = 256) -> torch.Tensor:
    """Model-space images [len(positions), 3, H, W] at the given positions of the ordered pass."""
    want = {int(p): None for p in positions}
    if any(p < 0 for p in want):
        raise EvalError(f"image positions must be >= 0, got {list(positions)}")
    seen = 0
    for pos, imgs, _ in iter_batches(shards, batch_size):
        for j, p in enumerate(pos.tolist()):
            if p in want:
                want[p] = imgs[j]
        seen += len(imgs)
        if all(v is not None for v in want.values()):
            break
    missing = [p for p, v in want.items() if v is None]
    if missing:
        raise EvalError(f"{shards} has {seen} readable samples; positions {missing} are out of range")
    return _model_input(torch.stack([want[int(p)] for p in positions]), device)


# --------------------------------------------------------------------------- features

@dataclass
class FeatureSet:
    z: np.ndarray         # float32 [N, D] frozen EMA encoder outputs
    attrs: np.ndarray     # float32 [N, A] the manifest's attribute table
    position: np.ndarray  # int64 [N] position in the ordered pass (the split key)
    attributes: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.z)

    def subset(self, mask: np.ndarray) -> "FeatureSet":
        return FeatureSet(self.z[mask], self.attrs[mask], self.position[mask], self.attributes, self.source)


@torch.no_grad()
def extract_features(encoder, shards: str | Path, device="cpu", batch_size: int = 256,
                     max_samples: int | None = None, num_workers: int = 0) -> FeatureSet:
    spec = shard_spec(shards)
    size = getattr(encoder, "image_size", spec.image_size)
    if spec.manifest is not None and spec.image_size != size:  # a made set of another size: likely the wrong one
        raise EvalError(f"{shards} holds {spec.image_size}x{spec.image_size} images but the encoder "
                        f"{encoder.name!r} expects {size}x{size}")
    # Without a manifest (other tools' shards, often of mixed sizes) images are resized on load.
    encoder.eval()
    zs, ys, ps, n = [], [], [], 0
    for pos, imgs, attrs in iter_batches(shards, batch_size, num_workers, image_size=size):
        if max_samples is not None:
            keep = max_samples - n
            pos, imgs, attrs = pos[:keep], imgs[:keep], attrs[:keep]
        zs.append(encoder(_model_input(imgs, device)).float().cpu().numpy())
        ys.append(attrs)
        ps.append(pos)
        n += len(imgs)
        if max_samples is not None and n >= max_samples:
            break
    if n == 0:
        raise EvalError(f"{shards}: no samples")
    src = str(Path(shards).resolve()) if isinstance(shards, (str, Path)) and Path(shards).exists() else str(shards)
    return FeatureSet(np.concatenate(zs), np.concatenate(ys), np.concatenate(ps), spec.attributes, src)


def _cache_key(export_file: Path, shards: str | Path, max_samples: int | None) -> str:
    st = export_file.stat()
    spec = shard_spec(shards)
    manifest = spec.manifest or {}
    ident = {"export": str(export_file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "shards": [str(Path(u).resolve()) if Path(u).exists() else u for u in spec.urls],
             "counts": spec.counts, "fingerprint": manifest.get("fingerprint"), "max_samples": max_samples}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(run: str | Path, shards: str | Path, encoder=None, device="cpu", batch_size: int = 256,
                    max_samples: int | None = None, num_workers: int = 0, log=print) -> FeatureSet:
    """Features of ``shards`` under the run's EMA encoder, from ``RUN/eval/features/`` when cached."""
    export_file = resolve_export(run)
    cache = run_dir_of(run) / "eval" / "features" / f"{_cache_key(export_file, shards, max_samples)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            return FeatureSet(f["z"], f["attrs"], f["position"], meta["attributes"], meta["source"])
    if encoder is None:
        encoder = load_run(run, device).encoder
    log(f"extracting features of {shards} ({'all' if max_samples is None else max_samples} samples) -> {cache}")
    fs = extract_features(encoder, shards, device, batch_size, max_samples, num_workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, z=fs.z, attrs=fs.attrs, position=fs.position,
             meta=np.array(json.dumps({"attributes": fs.attributes, "source": fs.source})))
    tmp.replace(cache)
    return fs


# --------------------------------------------------------------------------- splits

@dataclass
class Splits:
    train: FeatureSet
    val: FeatureSet
    test: FeatureSet
    description: str


def split_by_position(fs: FeatureSet, parts: tuple[str, ...]) -> dict[str, FeatureSet]:
    """Deterministic split by position modulo 10: train takes 0-7 (0-8 when only one other part is carved),
    then val 8, test 9. Independent of batch size and of where a sample cap cuts the pass."""
    r = fs.position % 10
    if parts == ("train", "val", "test"):
        return {"train": fs.subset(r < 8), "val": fs.subset(r == 8), "test": fs.subset(r == 9)}
    if len(parts) == 2:
        return {parts[0]: fs.subset(r < 9), parts[1]: fs.subset(r == 9)}
    raise ValueError(f"unsupported split parts {parts}")


def make_splits(train: FeatureSet, val: FeatureSet | None = None, test: FeatureSet | None = None) -> Splits:
    if val is not None and test is not None:
        return Splits(train, val, test, "train/val/test: the three shard sets as given")
    if val is None and test is None:
        s = split_by_position(train, ("train", "val", "test"))
        return Splits(s["train"], s["val"], s["test"],
                      "one shard set split deterministically by position mod 10: 0-7 train, 8 val, 9 test (80/10/10)")
    if test is None:
        s = split_by_position(train, ("train", "test"))
        return Splits(s["train"], val, s["test"], "val as given; train/test carved from --data by position "
                      "mod 10: 0-8 train, 9 test (90/10)")
    s = split_by_position(train, ("train", "val"))
    return Splits(s["train"], s["val"], test, "test as given; train/val carved from --data by position "
                  "mod 10: 0-8 train, 9 val (90/10)")


def check_same_attributes(*sets: FeatureSet) -> None:
    names = [tuple(a["name"] for a in s.attributes) for s in sets]
    if len(set(names)) > 1:
        raise EvalError("the shard sets have different attribute lists: " +
                        "; ".join(f"{s.source}: {', '.join(n)}" for s, n in zip(sets, names)))


__all__ = ["EvalError", "CheckpointError", "FeatureSet", "Splits", "load_run", "resolve_export", "run_dir_of",
           "load_images", "extract_features", "cached_features", "make_splits", "check_same_attributes"]
