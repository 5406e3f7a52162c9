"""Turn an ordered list of source items into a shard set: parallel shard writing, checksums,
the manifest, idempotent re-runs, and refusal of output directories that are not ours.

An output directory that already holds a shard set is replaced only when asked (``overwrite``).
The new set is written into a staging directory beside it (``.NAME.partial``) and renamed into
place when complete, so an interrupted or failed run leaves the old set as it was. Shard names are
a pure function of their position in the plan (``{prefix}-{i:06d}.tar``), every shard is written
to a temporary name and renamed when complete, and the manifest is written last. A shard that an
earlier run already wrote with the same configuration — in the old set, or in the staging
directory of an interrupted run (recorded in its journal) — is reused (hard-linked, else copied);
anything else is rewritten. Samples are never duplicated.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from diti_fast.data.errors import DataError, DataWarning
from diti_fast.data.manifest import FORMAT_TAG, FORMAT_VERSION, MANIFEST_NAME, write_manifest

from .tarwrite import LABEL_LAYOUT, Skipped, file_sha256, write_tar

JOURNAL_NAME = "manifest.partial.jsonl"


class OutputDirError(DataError):
    """The output directory holds files that a shard run did not make."""


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def _ours(prefix: str) -> re.Pattern:
    return re.compile(
        rf"^(?:{re.escape(prefix)}-\d{{6}}\.tar(?:\.tmp\d+)?|{re.escape(MANIFEST_NAME)}(?:\.tmp)?"
        rf"|{re.escape(JOURNAL_NAME)})$"
    )


def staging_dir(out: Path) -> Path:
    """Where a new set for ``out`` is written before it replaces ``out`` (same filesystem)."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.partial")


def _aside_dir(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def _set_members(out: Path, prefix: str) -> list[str]:
    """What in ``out`` belongs to a shard set of ours (shards, manifest, journal, temporaries)."""
    if not out.is_dir():
        return []
    pattern = _ours(prefix)
    return sorted(n for n in os.listdir(out) if pattern.match(n))


def check_target(out: Path, prefix: str, overwrite: bool, allowed_dirs: Sequence[str] = ()) -> dict | None:
    """Before any work: refuse ``out`` if it holds unrelated files, or a shard set while
    ``overwrite`` is off. Returns the manifest of the set there, if any."""
    manifest = check_out_dir(out, prefix, allowed_dirs)
    held = _set_members(out, prefix)
    if held and not overwrite:
        what = (f"a shard set of {manifest.get('num_samples')} samples in {len(manifest.get('shards', []))} shards"
                if manifest is not None else f"an incomplete shard set ({len(held)} file(s): {', '.join(held[:3])}"
                f"{', …' if len(held) > 3 else ''})")
        raise OutputDirError(f"{out}: already holds {what}; refusing to replace it. Pass --overwrite "
                             "(write_shards(overwrite=True)) to replace it: the new set is written beside it "
                             f"({staging_dir(out).name}) and takes its place only when complete")
    return manifest


def check_out_dir(out: Path, prefix: str, allowed_dirs: Sequence[str] = ()) -> dict | None:
    """Refuse a directory holding anything we did not write; return its manifest if it has one.
    ``allowed_dirs``: sub-directories that may be there (with their staging directories)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputDirError(f"{out}: output path exists and is not a directory")
    pattern = _ours(prefix)
    staged = re.compile(rf"^\.(?:{'|'.join(map(re.escape, allowed_dirs))})\.(?:partial|old-\d+)$") if allowed_dirs else None
    unrelated = [
        n for n in sorted(os.listdir(out))
        if not (pattern.match(n) or ((n in allowed_dirs or (staged and staged.match(n))) and (out / n).is_dir()))
    ]
    if unrelated:
        shown = ", ".join(unrelated[:5]) + (f" and {len(unrelated) - 5} more" if len(unrelated) > 5 else "")
        raise OutputDirError(
            f"{out}: refusing to write shards into a directory holding unrelated files ({shown}); "
            "use a new or empty directory, or one made earlier by `data_shards make`"
        )
    mpath = out / MANIFEST_NAME
    if not mpath.exists():
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OutputDirError(f"{mpath}: unreadable manifest; refusing to overwrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_TAG:
        raise OutputDirError(f"{mpath}: not a data_shards manifest; refusing to overwrite it")
    return manifest


def fingerprint_of(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Job:
    out_dir: str
    name: str
    items: list
    render: Callable[[list], Any]
    image_format: str
    quality: int
    attributes: list
    strict: bool


def _strict_guard(samples, strict: bool):
    for s in samples:
        if strict and isinstance(s, Skipped):
            raise DataError(f"{s.src or s.index}: {s.reason} (strict mode)")
        yield s


def _run_job(job: _Job) -> dict:
    written, skipped, digest, size = write_tar(
        Path(job.out_dir) / job.name,
        _strict_guard(job.render(job.items), job.strict),
        job.image_format,
        job.quality,
        job.attributes,
    )
    return {
        "name": job.name,
        "num_samples": written,
        "sha256": digest,
        "bytes": size,
        "planned": len(job.items),
        "skipped": [(s.index, s.src, s.reason) for s in skipped],
    }


def _read_journal(out: Path, fingerprint: str) -> dict[str, dict]:
    path = out / JOURNAL_NAME
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; that shard is simply redone
        if rec.get("fingerprint") == fingerprint:
            done[rec["shard"]["name"]] = rec["shard"]
    return done


def _still_valid(out: Path, shard: dict, verify: bool) -> bool:
    path = out / shard["name"]
    if not path.is_file() or path.stat().st_size != shard.get("bytes"):
        return False
    return not verify or file_sha256(path) == shard["sha256"]


def write_shards(
    out_dir: str | os.PathLike,
    *,
    items: Sequence,
    render: Callable[[list], Any],
    attributes: list[dict],
    image_size: int,
    source: str,
    config: dict[str, Any],
    split: str | None = None,
    image_format: str = "u8",
    quality: int = 95,
    maxcount: int = 2000,
    workers: int = 1,
    prefix: str = "shard",
    progress: bool = True,
    strict: bool = False,
    verify: bool = False,
    allowed_dirs: Sequence[str] = (),
    notes: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``items`` (already in final order) as shards of ``maxcount`` samples into ``out_dir``.

    ``render(list_of_items)`` runs in worker processes and yields ``tarwrite.Sample`` or
    ``tarwrite.Skipped`` per item; it and the items must be picklable. ``config`` is everything
    else that determines the output bytes; together with the encoding options it decides whether
    shards left by an earlier run can be kept. ``notes`` are recorded in the manifest as they are
    (e.g. attribute-table rows and images that did not match). ``overwrite``: replace a shard set
    already in ``out_dir`` (without it, such a directory is refused). Returns the manifest.
    """
    if maxcount < 1:
        raise ValueError("maxcount must be >= 1")
    final = Path(out_dir)
    old_manifest = check_target(final, prefix, overwrite, allowed_dirs)
    out = staging_dir(final)  # everything is written here, then renamed into place
    check_out_dir(out, prefix)
    out.mkdir(parents=True, exist_ok=True)

    fingerprint = fingerprint_of(
        dict(config, image_size=image_size, image_format=image_format, maxcount=maxcount,
             quality=quality if image_format == "jpg" else None, prefix=prefix,
             attributes=attributes, num_items=len(items), version=FORMAT_VERSION, labels=LABEL_LAYOUT)
    )
    reusable = _read_journal(out, fingerprint)  # an interrupted run's shards, in the staging directory
    if old_manifest is not None and old_manifest.get("fingerprint") == fingerprint:
        for s in old_manifest.get("shards", []):  # the old set's shards: linked in, the old set untouched
            if s["name"] not in reusable and _still_valid(final, s, verify):
                _link_or_copy(final / s["name"], out / s["name"])
                reusable[s["name"]] = s
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    plan = [
        (shard_name(prefix, i), list(items[start:start + maxcount]))
        for i, start in enumerate(range(0, len(items), maxcount))
    ]
    planned_names = {name for name, _ in plan}
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar")
    for n in os.listdir(out):  # shards from a larger earlier plan, and temporaries of a dead run
        if pattern.match(n) and (n not in planned_names or not n.endswith(".tar")):
            (out / n).unlink()

    results: dict[str, dict] = {}
    jobs = []
    for name, chunk in plan:
        old = reusable.get(name)
        if old is not None and _still_valid(out, old, verify):
            results[name] = dict(old, planned=len(chunk), skipped=old.get("skipped", []))
        else:
            jobs.append(_Job(str(out), name, chunk, render, image_format, quality, attributes, strict))

    journal = open(out / JOURNAL_NAME, "a", encoding="utf-8")
    bar = tqdm(total=len(items), unit="img", desc=f"{source}{'/' + split if split else ''} -> {out.name}",
               disable=not progress, file=sys.stderr)
    bar.update(sum(r["planned"] for r in results.values()))
    try:
        for res in _map(jobs, workers):
            results[res["name"]] = res
            journal.write(json.dumps({"fingerprint": fingerprint, "shard": res}) + "\n")
            journal.flush()
            bar.update(res["planned"])
    finally:
        bar.close()
        journal.close()

    shards = [results[name] for name, _ in plan]
    skipped = [tuple(s) for r in shards for s in r.get("skipped", [])]
    if skipped:
        first = skipped[0]
        warnings.warn(
            f"data_shards: skipped {len(skipped)} unreadable source image(s) out of {len(items)}; "
            f"first: {first[1] or first[0]}: {first[2]}",
            DataWarning,
            stacklevel=2,
        )
    manifest = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "source": source,
        "split": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "image_size": image_size,
        "channels": 3,
        "image_format": image_format,
        "image_layout": "CHW" if image_format == "u8" else "HWC-encoded",
        "attributes": attributes,
        "shards": [
            {k: s[k] for k in ("name", "num_samples", "sha256", "bytes", "skipped") if s.get(k) not in (None, [])}
            for s in shards
        ],
        "skipped_sources": [{"index": i, "src": src, "reason": why} for i, src, why in skipped[:100]],
        "num_skipped_sources": len(skipped),
        "params": config,
        "fingerprint": fingerprint,
        **(notes or {}),
    }
    write_manifest(out, manifest)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    _swap_in(out, final)
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _swap_in(staged: Path, final: Path) -> None:
    """Put the complete set in ``staged`` at ``final``; the old set there is removed only after."""
    aside = None
    if final.exists():
        aside = _aside_dir(final)
        os.rename(final, aside)
    os.rename(staged, final)
    if aside is not None:
        shutil.rmtree(aside)


def _map(jobs: list[_Job], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _run_job(job)
        return
    with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_run_job, jobs, chunksize=1)
