"""Process group and DeepSpeed set-up: the same code under deepspeed, torchrun and plain python."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diti_fast.engine.elastic import internals_error
from diti_fast.engine.run_config import TrainConfig


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: rank, world size, device and micro-batch, one object for the
    engine's helpers instead of four values."""
    rank: int
    world: int
    device: torch.device
    micro: int  # images per micro-batch on each rank

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes shared files and prints."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Join (or create) the process group; works under deepspeed, torchrun and plain python."""
    use_cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
    if not use_cuda:
        # Must precede `import deepspeed`, which picks its accelerator once.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    import deepspeed  # slow to import (seconds), and must follow DS_ACCELERATOR above
    if not use_cuda:
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op at process-group start
        # (minutes on a small machine); it only serves inference_all_reduce, which training never
        # calls. DeepSpeed keeps its op-compatibility table in one module-level dict, so marking
        # the op unavailable skips the build.
        skip_shm_build(deepspeed)
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" not in os.environ and not dist.is_initialized():
        # Plain `python train.py`: a one-process group of our own. Not through environment
        # variables, which would leak into any child process (and its port with them).
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on reading it
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts an existing group
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def skip_shm_build(deepspeed) -> None:
    """Mark DeepSpeed's shared-memory all-reduce op unavailable (its private op table)."""
    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(table, dict) or "deepspeed_shm_comm" not in table:
        raise internals_error("deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']",
                              "is missing (the CPU accelerator would JIT-build its shared-memory op)")
    table["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    micro = cfg.micro_batch(world)
    ds = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.deepspeed.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 2 ** 62,       # DeepSpeed's own log line reads the loss scale (a sync)
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at the start and end of every step;
        # the engine measures images/s itself (metrics.jsonl), so it stays off.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        # Precision is handled by the engine: fp32 master weights and optimiser state, bf16 autocast
        # in the forward (DeepSpeed's bf16 mode would cast the frozen DDPM's weights to bf16 too).
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
    }
    if cfg.deepspeed.zero_stage in (1, 2):
        # Without clipping the global gradient norm is not needed; computing it costs a host sync
        # per step. Non-finite steps are skipped by the engine's own device-side flag instead.
        ds["zero_optimization"]["compute_grad_norm"] = cfg.optim.grad_clip > 0
    return ds


def make_optimizer(params, cfg: TrainConfig, lr: float, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Plain Adam (L2-free, not AdamW), the fused implementation.

    We hand DeepSpeed a client optimiser rather than its "Adam" config entry, which with
    torch_adam silently turns into AdamW (weight decay 0.01) unless adam_w_mode is false. The
    fused kernel also accepts a device-side ``found_inf`` flag and then leaves parameters, moments
    and step count untouched: that is how a non-finite step is skipped without a host sync.
    ``capturable``: for a step captured in a CUDA graph (engine/graph_step.py); same arithmetic.
    """
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=True, capturable=capturable)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimiser under DeepSpeed's wrapper (ZeRO 1/2 wrap it; stage 0 does not)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


# --------------------------------------------------------------------------- agreeing on failures

class RankFailure(RuntimeError):
    """Something failed on at least one rank; raised on every rank with the same message."""


def _describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


def agree(what: str, error: BaseException | str | None = None, payload=None,
          exc: type[Exception] = RankFailure) -> list:
    """Collective: every rank says whether its part of ``what`` worked (and hands in ``payload``).

    If any rank failed, every rank raises the same ``exc`` naming the failed ranks, their hosts and
    errors. Without this, the healthy ranks would wait in their next collective for the failed one
    until the process-group timeout (30 minutes). Returns the payloads of all ranks, by rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if isinstance(error, exc):
            raise error  # alone: the error itself, its type kept
        if error is not None:
            raise exc(f"{what}: {_describe(error)}")
        return [payload]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (None if error is None else _describe(error), socket.gethostname(), payload))
    failed = [(r, host, err) for r, (err, host, _) in enumerate(reports) if err is not None]
    if failed:
        raise exc(f"{what}: " + "; ".join(f"rank {r} ({host}): {err}" for r, host, err in failed))
    return [p for _, _, p in reports]
