"""Training checkpoints: atomic, verified, per rank, weights-only loadable, the last K kept.

Layout of one checkpoint (``RUN/checkpoints/step-00001234/``)::

    model.pt            rank 0: {"module": full state dict (frozen DDPM included), "ema": {name: fp32}}
    rank-00000.pt       every rank: {"optimizer": its (ZeRO-partitioned) optimiser state, "rng": ...,
                        "data": data position}
    optimizer-full.pt   rank 0 (checkpoint.elastic): the Adam state gathered over ranks, by parameter
                        name, for a resume on another number of ranks or ZeRO stage (elastic.py)
    meta.json           written last: step, images, world_size, zero_stage, stage, data position,
                        and every file with its size and SHA-256

All ranks write into ``.tmp-step-00001234``; every file is fsynced, rank 0 writes meta.json,
fsyncs it and the directory, renames the directory into place and fsyncs the parent. So a
``step-*`` directory is complete even after a power cut, and a crash mid-write leaves only a
``.tmp-*`` directory (removed at the next start or save). Resume verifies sizes and checksums of
the files it reads and falls back to the previous checkpoint when one does not verify (a truncated
copy, an emptied meta.json, bit rot), saying what was wrong. Every file is plain tensors/ints/strings and loads
with ``torch.load(weights_only=True)``: DeepSpeed's ZeRO optimiser state holds a few Python objects
(its loss scaler, parameter-slice maps, an enum) that the weights-only unpickler refuses; those are
dropped on save and taken from the live optimiser on load (they are functions of the config, which
resume checks is unchanged).
"""
from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from diti_fast.engine import elastic
from diti_fast.engine.distributed import RankFailure, agree
from diti_fast.weights import load_state

STEP_DIR = re.compile(r"^step-(\d{8,})$")


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot be resumed into this launch (names what differs)."""


class IncompatibleCheckpoint(ResumeError):
    """A sound checkpoint that cannot serve this launch (an older one would not either)."""


class CheckpointSaveError(RankFailure):
    """Writing a checkpoint failed on some rank (disk full, permissions); raised on every rank."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-*`` directory, complete or not (resume verifies them), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), d) for d in root.iterdir()
                  if (m := STEP_DIR.match(d.name)) and d.is_dir())


def clean_temp(root: str | Path) -> None:
    """Remove what an interrupted save left (only safe while holding the run-directory lock)."""
    root = Path(root)
    for old in root.glob(".old-step-*"):
        # Re-saving a step moves the complete old directory aside first; a crash before the new one
        # took its place leaves it here: put it back rather than lose that step.
        final = root / old.name[len(".old-"):]
        if not final.exists():
            os.replace(old, final)
    for stale in (*root.glob(".tmp-step-*"), *root.glob(".old-step-*")):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- weights-only sanitising

_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _plain(v) -> bool:
    if isinstance(v, enum.Enum):
        return False
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, (str, int)) and _plain(x) for k, x in v.items())
    return False


def weights_only_part(state: dict) -> dict:
    """The entries of a (possibly DeepSpeed) optimiser state dict the weights-only loader accepts."""
    return {k: v for k, v in state.items() if _plain(v)}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, obj) -> dict:
    """Write, fsync, and describe the file (size, checksum) for meta.json."""
    with open(path, "wb") as f:
        if isinstance(obj, bytes):
            f.write(obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (and all of Windows) cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def save(root: Path, step: int, *, rank: int, files: dict, meta: dict, keep: int,
         fail: bool = False) -> Path:
    """Collective: every rank calls it with the files it writes (name -> object).

    Each phase ends with :func:`agree`, so an error on any rank (``fail`` simulates a full disk)
    makes every rank raise the same :class:`CheckpointSaveError` instead of leaving the others
    waiting; the half-written ``.tmp-*`` directory is removed at the next start.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_temp(root)
            tmp.mkdir()
        except OSError as e:
            err = e
    agree(f"checkpoint {final}: creating {tmp}", err, exc=CheckpointSaveError)
    written, err = {}, None
    try:
        for name, obj in files.items():
            if fail:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (debug.fail_save_rank)", str(tmp / name))
            written[name] = _fsync_write(tmp / name, obj)
    except OSError as e:
        err = e
    described = agree(f"checkpoint {final}: writing", err, written, exc=CheckpointSaveError)
    err = None
    if rank == 0:
        try:
            listing = {name: info for part in described for name, info in part.items()}
            body = json.dumps(dict(meta, step=step, files=listing, time=time.time()), indent=1).encode()
            _fsync_write(tmp / "meta.json", body)
            _fsync_dir(tmp)
            trash = None
            if final.exists():  # the same step saved again (a resumed run that ends where it began)
                trash = root / f".old-{final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(tmp, final)
            _fsync_dir(root)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            for _, old in checkpoint_dirs(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            err = e
    agree(f"checkpoint {final}: finishing", err, exc=CheckpointSaveError)
    return final


# --------------------------------------------------------------------------- verify, choose, load

def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{ckpt}/meta.json is missing or unreadable ({e})") from None
    if not isinstance(meta, dict) or not {"step", "world_size", "files"} <= set(meta):
        raise ResumeError(f"{ckpt}/meta.json lacks step/world_size/files")
    return meta


def verify(ckpt: Path, meta: dict, names: list[str]) -> None:
    """The listed files exist with the recorded size and checksum (older checkpoints list names only)."""
    listing = meta["files"]
    for name in names:
        path = Path(ckpt) / name
        if name not in listing:
            raise ResumeError(f"{path} is not listed in meta.json")
        if not path.is_file():
            raise ResumeError(f"{path} is missing")
        if isinstance(listing, dict):
            want, size = listing[name], path.stat().st_size
            if size != want["bytes"]:
                raise ResumeError(f"{path} has {size} bytes, meta.json says {want['bytes']} (truncated?)")
            if _sha256(path) != want["sha256"]:
                raise ResumeError(f"{path}: SHA-256 differs from meta.json (corrupted)")


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise ResumeError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{path}: not a weights-only torch file ({e})") from None


def same_layout(meta: dict, world_size: int, zero_stage: int) -> bool:
    return meta.get("world_size") == world_size and meta.get("zero_stage") == zero_stage


def files_needed(meta: dict, ckpt: Path, *, rank: int, world_size: int, zero_stage: int, stage: str) -> list[str]:
    """What this rank reads: its own rank file, or the gathered optimiser state on a layout change.
    A checkpoint that is fine but cannot serve this launch raises (no fall-back: an older one
    would not serve it either)."""
    if meta.get("stage") != stage:
        raise IncompatibleCheckpoint(f"cannot resume from {ckpt}: stage was {meta.get('stage')!r}, now {stage!r}")
    if same_layout(meta, world_size, zero_stage):
        return ["model.pt", f"rank-{rank:05d}.pt"]
    if elastic.FILE not in meta["files"]:
        raise IncompatibleCheckpoint(
            f"cannot resume from {ckpt}: it was written by {meta.get('world_size')} ranks at ZeRO stage "
            f"{meta.get('zero_stage')} without {elastic.FILE} (checkpoint.elastic=false), and this launch "
            f"has {world_size} ranks at stage {zero_stage}; relaunch with the old layout")
    return ["model.pt", elastic.FILE]


def select_checkpoint(root: Path, *, rank: int, world_size: int, zero_stage: int,
                      stage: str) -> tuple[Path, dict] | None:
    """Collective: the newest checkpoint that verifies on every rank, or None if there is none at all.

    A checkpoint that fails on any rank is skipped by all of them, with a warning (rank 0) naming
    what was wrong; if every one fails, a :class:`ResumeError` lists them all (starting afresh over
    a broken run would silently throw its progress away).
    """
    found = checkpoint_dirs(root)
    problems = []
    for _, path in reversed(found):
        problem, fatal, meta = None, False, None
        try:
            meta = read_meta(path)
            names = files_needed(meta, path, rank=rank, world_size=world_size, zero_stage=zero_stage, stage=stage)
            verify(path, meta, names)
        except IncompatibleCheckpoint as e:
            problem, fatal = str(e), True
        except (ResumeError, OSError) as e:
            problem = str(e)
        bad = [(r, p, f) for r, (p, f) in enumerate(agree(f"verifying {path}", payload=(problem, fatal)))
               if p is not None]
        if not bad:
            return path, meta
        why = "; ".join(p if world_size == 1 else f"rank {r}: {p}" for r, p, _ in bad)
        if any(f for _, _, f in bad):
            raise ResumeError(why)
        problems.append(why)
        if rank == 0:
            print(f"[diti-fast] warning: {why}; falling back to the previous checkpoint", flush=True)
    if problems:
        raise ResumeError(f"no complete checkpoint in {root} to resume from: " + " | ".join(problems) +
                          " (move the broken ones away, or set a new run.dir to start afresh)")
    return None


def checkpoint_step(path: Path | None) -> int | None:
    m = STEP_DIR.match(path.name) if path is not None else None
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the engine's state


def _param_names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def save_checkpoint(cfg, run_dir: Path, engine, ema, data, step: int, ranks) -> Path:
    """The whole training state at ``step`` (collective): model + EMA on rank 0, optimiser/RNG/data per rank.
    ``ranks``: this process's :class:`~diti_fast.engine.run_state.Ranks`."""
    rank, world = ranks.rank, ranks.world
    files = {f"rank-{rank:05d}.pt": {"optimizer": weights_only_part(engine.optimizer.state_dict()),
                                     "rng": rng_state(), "data": dict(data.position), "step": step}}
    full = elastic.full_optimizer_state(engine, _param_names(engine), rank) if cfg.checkpoint.elastic else None
    if rank == 0:
        files["model.pt"] = {"module": engine.module.state_dict(), "ema": ema.state_dict()}
        if full is not None:
            files[elastic.FILE] = full
    meta = {"images": step * cfg.data.batch_size, "zero_stage": cfg.deepspeed.zero_stage, "stage": cfg.stage,
            "world_size": world, "micro_batch": data.micro, "data": dict(data.position)}
    return save(run_dir / "checkpoints", step, rank=rank, files=files, meta=meta, keep=cfg.checkpoint.keep,
                fail=cfg.debug.fail_save_rank == rank)


def load_checkpoint(cfg, path: Path, meta: dict, engine, ema, ranks) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns (step, data position). Collective (every
    rank loads; a failure anywhere is raised everywhere)."""
    rank, world, micro = ranks.rank, ranks.world, ranks.micro
    step = int(meta["step"])
    position, err = None, None
    try:
        model = load_file(path / "model.pt")
        load_state(engine.module, model["module"], f"{path}/model.pt [module]")
        ema.load_state_dict(model["ema"], f"{path}/model.pt [ema]")
        if same_layout(meta, world, cfg.deepspeed.zero_stage):
            mine = load_file(path / f"rank-{rank:05d}.pt")
            if cfg.deepspeed.zero_stage == 0:
                engine.optimizer.load_state_dict(mine["optimizer"])
            else:
                # Fill the entries dropped at save time (Python objects) from the live optimiser.
                state = engine.optimizer.state_dict()
                state.update(mine["optimizer"])
                engine.optimizer.load_state_dict([state] * world, load_optimizer_states=True,
                                                 load_from_fp32_weights=True)
            set_rng_state(mine["rng"])
            position = mine["data"]
        else:
            elastic.load_full_optimizer_state(engine, load_file(path / elastic.FILE), _param_names(engine),
                                              f"{path}/{elastic.FILE}")
            # Dropout's per-rank generators cannot be re-partitioned: a fresh, reproducible seed.
            torch.manual_seed(cfg.run.seed * 1_000_003 + step * 7919 + rank)
            position = elastic.map_position(meta, world, micro)
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree
        err = e
    agree(f"resuming from {path}", err, exc=ResumeError)
    engine.global_steps = step
    engine.global_samples = step * cfg.data.batch_size
    engine.micro_steps = step * cfg.deepspeed.grad_accum
    return step, position
