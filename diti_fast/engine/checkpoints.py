"""Training checkpoints: atomic, per rank, weights-only loadable, the last K kept.

Layout of one checkpoint (``RUN/checkpoints/step-00001234/``)::

    model.pt        rank 0: {"module": full state dict (frozen DDPM included), "ema": {name: fp32}}
    rank-00000.pt   every rank: {"optimizer": its (ZeRO-partitioned) optimiser state, "rng": ...,
                    "data": data position}
    meta.json       written last: step, images, world_size, zero_stage, stage, files

All ranks write into ``.tmp-step-00001234`` and rank 0 renames the finished directory into place,
so a checkpoint directory either is complete or does not exist (a crash mid-write leaves only a
``.tmp-*`` directory, removed by the next save). Every file is plain tensors/ints/strings and loads
with ``torch.load(weights_only=True)``: DeepSpeed's ZeRO optimiser state holds a few Python objects
(its loss scaler, parameter-slice maps, an enum) that the weights-only unpickler refuses; those are
dropped on save and taken from the live optimiser on load (they are functions of the config, which
resume checks is unchanged).
"""
from __future__ import annotations

import enum
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from diti_fast.weights import load_state

STEP_DIR = re.compile(r"^step-(\d{8,})$")


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot be resumed into this launch (names what differs)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "meta.json").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


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


# --------------------------------------------------------------------------- save / load

def _fsync_write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save(root: Path, step: int, *, rank: int, world_size: int, barrier, model_state: dict | None,
         rank_state: dict, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. ``model_state`` is used on rank 0 only."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (*root.glob(".tmp-step-*"), *root.glob(".old-step-*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _fsync_write(tmp / f"rank-{rank:05d}.pt", rank_state)
    if rank == 0:
        _fsync_write(tmp / "model.pt", model_state)
    barrier()
    if rank == 0:
        files = sorted(p.name for p in tmp.iterdir())
        meta = dict(meta, step=step, world_size=world_size, files=files, time=time.time())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        trash = None
        if final.exists():  # the same step saved again (e.g. a resumed run that ends where it began)
            trash = root / f".old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{ckpt}/meta.json is unreadable ({e})") from None


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise ResumeError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{path}: not a weights-only torch file ({e})") from None


def check_compatible(meta: dict, ckpt: Path, *, world_size: int, zero_stage: int, stage: str) -> None:
    problems = []
    if meta.get("world_size") != world_size:
        problems.append(f"it was written by {meta.get('world_size')} ranks, this launch has {world_size}")
    if meta.get("zero_stage") != zero_stage:
        problems.append(f"deepspeed.zero_stage was {meta.get('zero_stage')}, now {zero_stage}")
    if meta.get("stage") != stage:
        problems.append(f"stage was {meta.get('stage')!r}, now {stage!r}")
    if problems:
        raise ResumeError(f"cannot resume from {ckpt}: " + "; ".join(problems) +
                          " (the optimiser state is partitioned per rank; relaunch with the same layout, "
                          "or set checkpoint.resume=false / a new run.dir to start afresh)")


def checkpoint_step(path: Path | None) -> int | None:
    m = STEP_DIR.match(path.name) if path is not None else None
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the engine's state


def save_checkpoint(cfg, run_dir: Path, engine, ema, data, step: int, rank: int, world: int) -> Path:
    """The whole training state at ``step`` (collective): model + EMA on rank 0, optimiser/RNG/data per rank."""
    model_state = None
    if rank == 0:
        model_state = {"module": engine.module.state_dict(), "ema": ema.state_dict()}
    rank_state = {"optimizer": weights_only_part(engine.optimizer.state_dict()),
                  "rng": rng_state(), "data": dict(data.position), "step": step}
    meta = {"images": step * cfg.data.batch_size, "zero_stage": cfg.deepspeed.zero_stage,
            "stage": cfg.stage}
    return save(run_dir / "checkpoints", step, rank=rank, world_size=world, barrier=torch.distributed.barrier,
                     model_state=model_state, rank_state=rank_state, meta=meta, keep=cfg.checkpoint.keep)


def load_checkpoint(cfg, path: Path, engine, ema, rank: int, world: int) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns (step, data position)."""
    meta = read_meta(path)
    check_compatible(meta, path, world_size=world, zero_stage=cfg.deepspeed.zero_stage, stage=cfg.stage)
    model = load_file(path / "model.pt")
    load_state(engine.module, model["module"], f"{path}/model.pt [module]")
    ema.load_state_dict(model["ema"], f"{path}/model.pt [ema]")
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
    step = int(meta["step"])
    engine.global_steps = step
    engine.global_samples = step * cfg.data.batch_size
    engine.micro_steps = step * cfg.deepspeed.grad_accum
    return step, mine["data"]
