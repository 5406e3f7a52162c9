"""Device-side metric accumulation, reduced and written every ``log.every`` steps.

During a step nothing leaves the device: the loss, the per-t-bucket sums and counts and the
non-finite flags are added into small device tensors. :meth:`Meter.reduce` (called at log time, the
one host synchronisation) all-reduces them over ranks and returns plain numbers; :class:`Logger`
writes them to ``RUN/metrics.jsonl`` and, if the ``tensorboard`` package is installed, TensorBoard.
"""
from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class Meter:
    def __init__(self, num_buckets: int, timesteps: int, device: torch.device):
        self.num_buckets, self.timesteps, self.device = num_buckets, timesteps, device
        # One flat buffer so a reduction is one all_reduce:
        # [loss_sum, samples, nonfinite_steps, consecutive_nonfinite, max_consecutive, bucket sums..., counts...]
        self.buf = torch.zeros(5 + 2 * num_buckets, dtype=torch.float64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.float64, device=device)  # survives resets

    def add_samples(self, per_sample: torch.Tensor, t: torch.Tensor,
                    buckets: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Per-sample losses (finite or not) of one micro-batch. ``buckets``: the fused loss kernel's
        per-t-bucket (sums, counts) from the same pass, used instead of recomputing them here; a
        bucket whose sum is not finite is left out whole (the kernel does not say which sample)."""
        ps = per_sample.detach().to(torch.float64)
        finite = torch.isfinite(ps)
        ps = torch.where(finite, ps, torch.zeros_like(ps))  # a NaN step must not poison the averages
        nb = self.num_buckets
        self.buf[0] += ps.sum()
        self.buf[1] += finite.sum()
        if buckets is not None:
            bsum, bcount = (b.detach().to(torch.float64) for b in buckets)
            ok = torch.isfinite(bsum)
            self.buf[5:5 + nb] += torch.where(ok, bsum, 0.0)
            self.buf[5 + nb:] += torch.where(ok, bcount, 0.0)
            return
        b = (t.long() * nb) // self.timesteps
        self.buf[5:5 + nb].index_add_(0, b, ps)
        self.buf[5 + nb:].index_add_(0, b, finite.to(torch.float64))

    def add_step(self, ok: torch.Tensor) -> None:
        """``ok``: 0-dim bool, the step's all-rank "loss was finite" flag (identical on every rank)."""
        bad = (~ok).to(torch.float64)
        self.buf[2] += bad
        self.consecutive.add_(1.0).mul_(bad)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.buf[4], self.consecutive, out=self.buf[4])

    def reduce(self) -> dict:
        """All-reduce over ranks (a sync) and reset; returns plain Python numbers."""
        buf = self.buf.clone()
        nb = self.num_buckets
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Step flags are identical on every rank: reduce only the sample sums.
            dist.all_reduce(buf[:2], op=dist.ReduceOp.SUM)
            dist.all_reduce(buf[5:], op=dist.ReduceOp.SUM)
        vals = buf.tolist()
        cur = float(self.consecutive.item())
        self.buf.zero_()
        sums, counts = vals[5:5 + nb], vals[5 + nb:]
        return {
            "loss": vals[0] / vals[1] if vals[1] else float("nan"),
            "samples": int(vals[1]),
            "loss_t": [s / c if c else None for s, c in zip(sums, counts)],
            "nonfinite_steps": int(vals[2]),
            "max_consecutive_nonfinite": int(vals[4]),
            "consecutive_nonfinite": int(cur),
        }


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: the process's peak resident set (Linux reports KiB, macOS bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Logger:
    """Rank 0 writes; other ranks hold a Logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool | str, t_buckets: int, timesteps: int):
        """``tensorboard``: True (required: the config check already made sure it is installed),
        "auto" (when the package is installed) or False."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bucket_edges = [timesteps * i // t_buckets for i in range(t_buckets + 1)]
        self.tb = None
        if enabled and tensorboard and (tensorboard is True or importlib.util.find_spec("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter  # optional package, slow import: only when on
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record, time=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k in ("loss", "images_per_s", "lr", "peak_memory_bytes", "nonfinite_steps"):
                if record.get(k) is not None:
                    self.tb.add_scalar(k, record[k], step)
            for i, v in enumerate(record.get("loss_t") or []):
                if v is not None:
                    lo, hi = self.bucket_edges[i], self.bucket_edges[i + 1]
                    self.tb.add_scalar(f"loss_t/{lo:04d}-{hi - 1:04d}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
