"""Timed training runs inside a phase's child process (phases sweep, engine and compile).

Every run goes through the engine's public entry points only: ``load_config`` with train.py's
overrides, then ``train``. What makes the timings comparable across rows:

- the data: ``data.source=fixed``, one uint8 batch drawn from the seed and staged on the device
  once, the same for every row;
- the clock: one log interval of warm-up steps (cuDNN autotuning, the CUDA graph's eager steps
  and capture), then one log interval of timed steps. The engine reduces its metrics (the only
  host syncs) at the end of each interval, so the timed interval is ``synchronize ... steps ...
  synchronize``;
- DeepSpeed's throughput timer and wall-clock breakdown are off (the engine's DeepSpeed config
  turns them off for every run: the timer would synchronise the device twice per eager step,
  which a captured step never pays);
- the matmul precision flags are put back to torch's defaults before every run, so an fp32 row
  after a bf16 row (which turns TF32 matmuls on) is still fp32.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from pathlib import Path

from gpucheck.settings import COMMON_OVERRIDES, REPO


def engine_api():
    """(load_config, train, resolved_dict): the entry points train.py itself uses."""
    from diti_fast.engine.config_files import load_config, resolved_dict
    from diti_fast.engine.loop import train
    return load_config, train, resolved_dict


def reset_backends() -> None:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False   # torch's defaults
    torch.backends.cudnn.allow_tf32 = True


def _perturb_zero_weights(module, std: float = 0.02) -> None:
    """The UNet zero-initialises its output convolutions, so a fresh DDPM predicts ε̂ = 0 whatever
    its trunk computes, and loss curves could not tell bf16 from fp32 in the frozen trunk. Small
    random values make its output depend on every layer."""
    import torch
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def ensure_ddpm(tmp: Path, config: str) -> Path:
    """A random-weight DDPM export of ``config``'s network (speed does not depend on the weights;
    every run of every phase gets the same file). Made once per gpu_check run."""
    path = tmp / "ddpm" / f"{Path(config).stem}.safetensors"
    if path.is_file():
        return path
    import torch
    from diti_fast.nn import build_unet
    from diti_fast.weights import save_export
    load_config, _, resolved_dict = engine_api()
    base = load_config(config, ["stage=ddpm", "data.source=fixed"])
    torch.manual_seed(0)
    unet = build_unet(base.model)
    _perturb_zero_weights(unet)
    part = path.with_suffix(".part.safetensors")
    save_export(part, "ddpm", base.model, resolved_dict(base), unet=unet)
    part.replace(path)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def train_run(tmp: Path, name: str, config: str, overrides: list[str], batch: int, steps: int, log_every: int,
              cap_s: float, ddpm: Path, keep_dir: bool = False) -> dict:
    """One ``train()`` run of ``steps`` steps at global ``batch`` (one process: per-GPU = global),
    stopped by the engine itself after ``cap_s`` seconds of steps (run.time_limit_minutes).
    Returns what its metrics say, with the log records."""
    import torch
    load_config, train, _ = engine_api()
    reset_backends()
    cuda = torch.cuda.is_available()
    run_dir = tmp / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    ov = [*COMMON_OVERRIDES, f"data.batch_size={batch}", f"run.max_images={steps * batch}",
          f"log.every={log_every}", f"init.ddpm={ddpm}", f"run.dir={run_dir}",
          f"run.device={'cuda' if cuda else 'cpu'}", f"run.time_limit_minutes={max(cap_s, 1.0) / 60:.4f}", *overrides]
    row: dict = {"name": name, "config": config, "overrides": overrides, "batch": batch, "steps": steps,
                 "log_every": log_every, "cap_s": round(cap_s, 1)}
    t0 = time.monotonic()
    try:
        cfg = load_config(str(REPO / config) if not Path(config).is_absolute() else config, ov)
        res = train(cfg)
        row["status"] = "ok" if res.status == "done" else f"cut ({res.status})"
        row["steps_done"] = getattr(res, "step", None)
    except Exception as e:  # noqa: BLE001 - one run's failure is a row, not the end of the phase
        row["status"] = "failed"
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    row["wall_s"] = round(time.monotonic() - t0, 2)
    row["records"] = [{k: r.get(k) for k in ("step", "images", "images_per_s", "loss", "peak_memory_bytes")}
                      for r in read_metrics(run_dir)]
    if not keep_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row


def timed_interval(row: dict, warmup_steps: int) -> dict:
    """images/s of the log interval that starts at ``warmup_steps`` (the timed one); {} if the run
    never got through it."""
    prev = None
    for r in row.get("records", []):
        if prev is not None and prev.get("step") == warmup_steps and r.get("images_per_s"):
            n = r["step"] - prev["step"]
            ips = r["images_per_s"]
            return {"images_per_s": ips, "step_s": row["batch"] / ips, "timed_steps": n,
                    "peak_memory_bytes": r.get("peak_memory_bytes"), "loss": r.get("loss")}
        prev = r
    return {}


class Incremental:
    """A phase's JSON, rewritten (atomically) after every change: a child killed by its limit
    leaves everything it finished."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = Path(path), data
        self.save()

    def save(self) -> None:
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(part, self.path)
