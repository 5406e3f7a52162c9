"""diti-fast's training loop: DDPM pre-training and DiTi under DeepSpeed, readable top to bottom.

Launched through ``diti_fast/train.py`` (the script the launchers run) or ``diti-fast train``:

    deepspeed --num_gpus 8 diti_fast/train.py --config celeba64
    torchrun --nproc_per_node 8 diti_fast/train.py --config my_run.yaml
    python -m diti_fast.train --config shapes32 stage=ddpm          # one process, CPU or one GPU
    diti-fast train --config shapes32 optim.lr=2e-4 run.dir=runs/x   # the console script

Overrides are ``dotted.key=value`` (see docs/training.md). The run directory holds the resolved
``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-XXXXXXXX/`` and ``export/ema.safetensors``;
relaunching the same command resumes from the latest complete checkpoint.

Reading order: ``train()`` checks what it can before any work, ``_train()`` sets up (process
group, run directory, models, frozen DDPM, DeepSpeed, resume) and runs the loop. Helpers in this
package, one job each: ``step.py`` (the optimiser step, written once), ``graph_step.py`` (that step
captured as a CUDA graph), ``objective.py`` (models + loss + frozen DDPM), ``microbatches.py``
(micro-batches, resumable), ``distributed.py`` (process group, DeepSpeed config, optimiser),
``checkpoints.py`` (atomic training checkpoints), ``run_state.py`` (what a checkpoint and an
export are made of), ``stopping.py`` (signals, time limit), ``faults.py`` (the ``debug`` section's
fault injection), ``ema.py``, ``metrics.py``, ``noise.py`` (t and ε by sample index),
``run_config.py`` (the run config and presets). Per optimiser step: micro-batches ->
forward/backward (t and ε keyed by global sample index) -> one all-reduced "loss finite" flag on
the device -> optimiser step (skipped on the device when not finite) -> EMA -> device-side
metrics; host syncs only at log / checkpoint / signal-agreement steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from diti_fast.config import ConfigError
from diti_fast.data.errors import DataError
from diti_fast.engine import checkpoints as ckpt
from diti_fast.engine import run_lock
from diti_fast.engine.checkpoints import load_checkpoint
from diti_fast.engine.distributed import (RankFailure, Ranks, base_optimizer, deepspeed_config, make_optimizer,
                                          setup_distributed)
from diti_fast.engine.elastic import check_internals
from diti_fast.engine.ema import EMA
from diti_fast.engine.faults import Faults
from diti_fast.engine.graph_step import GraphStep, StepPlan, plan_step
from diti_fast.engine.metrics import Logger, Meter, peak_memory_bytes
from diti_fast.engine.microbatches import MicroBatches, check_shards
from diti_fast.engine.objective import Objective, check_init_ddpm, load_frozen_ddpm, load_start_ddpm
from diti_fast.engine.config_files import PRESETS, dump_yaml, load_config, resolved_dict
from diti_fast.engine.resume_rules import resume_conflicts
from diti_fast.engine.run_config import TrainConfig, validate_runtime
from diti_fast.engine.run_state import Run
from diti_fast.engine.step import DeepSpeedDriver, EagerStep, StepBody
from diti_fast.engine.stopping import StopSignal, stop_reason
from diti_fast.engine.visuals import Visuals
from diti_fast.files import write_text_atomic
from diti_fast.weights import CheckpointError

EXIT_SIGNAL = 75      # EX_TEMPFAIL: stopped early (signal, time limit) after a checkpoint; relaunch to resume
EXIT_NONFINITE = 3    # too many consecutive non-finite losses
EXIT_CONFIG = 2       # bad configuration / input (or no checkpoint to resume), nothing was done
EXIT_RANK_FAILURE = 4  # a collective step failed on some rank (e.g. a checkpoint write: disk full)


class NonFiniteLoss(RuntimeError):
    """The loss was NaN/inf for guard.max_consecutive_nonfinite steps in a row."""


@dataclass
class TrainResult:
    status: str            # "done" | "signal" | "time_limit" (a "nonfinite" stop raises NonFiniteLoss)
    step: int
    run_dir: Path
    export: Path | None = None
    last_checkpoint: Path | None = None


def resolve_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{cfg.preset or 'run'}-{cfg.stage}"


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, ranks: Ranks) -> tuple[Path, dict] | None:
    """Collective. The run-directory lock (rank 0), the check that every rank sees the same
    directory, config conflicts vs. a previous launch, the checkpoint to resume from (newest that
    verifies); writes config.yaml. An error on any rank is raised on all of them."""
    rank, world = ranks.rank, ranks.world
    run_lock.claim(run_dir, rank)
    if rank == 0:
        ckpt.clean_temp(run_dir / "checkpoints")  # a crashed save's leftovers; safe under the lock
    existing = ckpt.checkpoint_dirs(run_dir / "checkpoints")
    if existing and not cfg.checkpoint.resume:
        raise ConfigError(f"run.dir={run_dir} already holds checkpoints (latest {existing[-1][1].name}) but "
                          "checkpoint.resume=false; choose a new run.dir or remove the old one")
    found = ckpt.select_checkpoint(run_dir / "checkpoints", rank=rank, world_size=world,
                                   zero_stage=cfg.deepspeed.zero_stage, stage=cfg.stage)
    saved_cfg = run_dir / "config.yaml"
    if found is not None:
        if saved_cfg.is_file():
            conflicts = resume_conflicts(yaml.safe_load(saved_cfg.read_text()) or {}, resolved_dict(cfg))
            if conflicts:
                raise ConfigError(f"cannot resume {run_dir}: the config differs from the saved "
                                  f"{saved_cfg} in " + "; ".join(conflicts) +
                                  " (use a new run.dir to train with these settings)")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved_cfg, dump_yaml(cfg, world))
    return found


# ============================================================================ the run

def train(cfg: TrainConfig) -> TrainResult:
    # Everything that can be checked without the process group is checked first, so a bad
    # config or data path fails in a second, before DeepSpeed is even imported.
    world = int(os.environ.get("WORLD_SIZE", 1))
    device_type = "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
    validate_runtime(cfg, world, device_type)
    micro = cfg.micro_batch(world)
    size = cfg.image_size(check_shards(cfg, world, micro))
    # Record the resolved image size in the saved config and the export (sampling reads it there).
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    if (cfg.stage == "diti" or cfg.init.finetune) and not ckpt.checkpoint_dirs(resolve_run_dir(cfg) / "checkpoints"):
        check_init_ddpm(cfg)  # a resumed run takes the DDPM from its checkpoint instead
    threads = torch.get_num_threads()
    if cfg.run.threads and device_type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    try:
        return _train(cfg, micro, size)
    except BaseException as e:
        run_lock.release_held(error=e)  # status.json says "failed" (rank 0)
        raise
    finally:
        run_lock.release_held()  # the run-directory lock _train took (rank 0), on every way out
        torch.set_num_threads(threads)  # in-process callers (tests, the demo) get theirs back


def _train(cfg: TrainConfig, micro: int, size: int) -> TrainResult:
    ranks = Ranks(*setup_distributed(cfg), micro)
    run_dir = resolve_run_dir(cfg)
    found = prepare_run_dir(cfg, run_dir, ranks)
    latest = found[0] if found else None
    objective, engine, opt, ema, plan, origin = _build(cfg, ranks, latest)
    step, position = 0, None
    if latest is not None:
        step, position = load_checkpoint(cfg, latest, found[1], engine, ema, ranks)
    data = MicroBatches(cfg, ranks, size, position)
    run = Run(cfg, run_dir, ranks, objective, engine, ema, data, last_checkpoint=latest)
    total = cfg.total_steps()
    meter = Meter(cfg.log.t_buckets, cfg.model.diffusion.timesteps, ranks.device)
    logger = Logger(run_dir, ranks.lead, cfg.log.tensorboard, cfg.log.t_buckets, cfg.model.diffusion.timesteps)
    visuals = Visuals(cfg, run_dir, ranks.lead, logger.tb)  # grids every log.visuals_every steps (0: off)
    stop = StopSignal(cfg.checkpoint.on_signal, ranks.world)
    faults = Faults(cfg, ranks, run_dir, stop)
    stepper = make_step(plan, cfg, run, opt, meter, faults, step)
    report = Report(cfg, run, meter, logger, step, total)
    _announce(cfg, run, plan, step, total, origin)

    status, exported = "done", None
    deadline = time.monotonic() + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    try:
        while step < total:
            stepper.step(step)  # one optimiser step: grad_accum micro-batches on every rank
            step += 1
            visuals.maybe(step, objective, ema, stepper.x0)
            report.after(step)  # metrics every log.every steps (the host syncs), the non-finite guard
            faults.after_step(step)
            run.periodic(step, total, meter)
            reason = stop_reason(stop, deadline, step, ranks.world, cfg.checkpoint.signal_sync_every)
            if reason is not None and step < total:
                status, exported = reason, _stop_early(run, reason, step)
                break
    finally:
        stop.close()
        faults.close()
        report.close()

    result = TrainResult(status, step, run_dir, export=exported, last_checkpoint=run.last_checkpoint)
    if status == "done":
        if not run.saved_at(step):
            result.last_checkpoint = run.save(step)
        if ranks.lead:
            result.export = run.export()
            print(f"[diti-fast] done: {step} steps, {step * cfg.data.batch_size} images; EMA weights in "
                  f"{result.export}", flush=True)
            run_lock.write_status(run_dir, "done", step=step, exit_code=0, checkpoint=str(result.last_checkpoint))
        dist.barrier()
    return result


def _build(cfg: TrainConfig, ranks: Ranks, latest: Path | None):
    """Models (same init on every rank), frozen DDPM, optimiser, DeepSpeed, EMA. Returns them with
    the step plan and where the weights came from (for the start line)."""
    device = ranks.device
    autocast = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        if autocast:
            torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)
    objective = Objective(cfg, device, autocast)
    origin = ""
    if cfg.stage == "diti" and latest is None:  # a resumed run gets it from the checkpoint
        origin = f" frozen DDPM from {load_frozen_ddpm(objective.decoder, cfg)}"
    if cfg.stage == "ddpm" and cfg.init.finetune and latest is None:  # fine-tuning; a resume has its weights
        origin = f" fine-tuning the DDPM from {load_start_ddpm(objective.unet, cfg)}"
    objective.to(device).train()
    trainable = objective.trainable()
    plan = plan_step(cfg, device)  # the whole step as one CUDA graph, where it can be
    opt = make_optimizer([p for _, p in trainable], cfg, cfg.lr(ranks.world), device, capturable=plan.capture)
    import deepspeed  # slow to import (seconds): only once the config and data have been checked
    engine, *_ = deepspeed.initialize(model=objective, optimizer=opt, config=deepspeed_config(cfg, ranks.world))
    check_internals(engine)  # a DeepSpeed whose private ZeRO state moved fails now, by name
    opt = base_optimizer(engine)
    if cfg.deepspeed.zero_stage == 0:
        objective.channels_last_weights()  # after DeepSpeed's start-up (see Objective)
    ema = EMA(trainable, cfg.ema.decay)
    if cfg.fast.compile:
        objective.compile(mode=cfg.fast.compile_mode)
    # Dropout draws from the per-rank generator (t and ε do not): seed it per rank.
    torch.manual_seed(cfg.run.seed * 1_000_003 + ranks.rank)
    return objective, engine, opt, ema, plan, origin


def make_step(plan: StepPlan, cfg: TrainConfig, run: Run, opt, meter: Meter, faults: Faults, step: int):
    """The step the plan asks for: the graph-safe one (captured on CUDA) or DeepSpeed's."""
    r = run.ranks
    if plan.graph_safe:
        return GraphStep(plan, cfg, run.objective, opt, run.ema, meter, run.data, r, step, faults)
    return EagerStep(StepBody(cfg, DeepSpeedDriver(run.engine), opt, run.ema, meter, faults, r, step), run.data)


def _announce(cfg: TrainConfig, run: Run, plan: StepPlan, step: int, total: int, origin: str) -> None:
    if not run.ranks.lead:
        return
    r, world, lr = run.ranks, run.ranks.world, cfg.lr(run.ranks.world)
    autocast = run.objective.autocast
    n_train = sum(p.numel() for _, p in run.objective.trainable())
    n_all = sum(p.numel() for p in run.objective.parameters())
    print(f"[diti-fast] stage={cfg.stage} run={run.dir} ranks={world} device={r.device} "
          f"precision={'bf16-autocast' if autocast else 'fp32'} zero={cfg.deepspeed.zero_stage} "
          f"batch={cfg.data.batch_size} (micro {r.micro} x accum {cfg.deepspeed.grad_accum} x {world}) "
          f"lr={lr:g} (optim.lr_rule={cfg.lr_rule()}, optim.lr={cfg.optim.lr:g}) "
          f"params={n_train / 1e6:.2f}M trainable / {n_all / 1e6:.2f}M steps={step}->{total}"
          + (f" resumed from {run.last_checkpoint}" if run.last_checkpoint else "") + origin
          + (" cuda-graph" if plan.capture else ""), flush=True)
    if plan.reason:
        print(f"[diti-fast] {plan.reason}", flush=True)


class Report:
    """Host-side bookkeeping after each step: the progress bar, and every ``log.every`` steps (and
    at the last) the reduced metrics, written, and the non-finite guard. The only host syncs."""

    def __init__(self, cfg: TrainConfig, run: Run, meter: Meter, logger: Logger, step: int, total: int):
        self.cfg, self.run, self.meter, self.logger, self.total = cfg, run, meter, logger, total
        self.lr, self.t_log, self.step_log = cfg.lr(run.ranks.world), time.perf_counter(), step
        self.bar = None
        if run.ranks.lead and cfg.log.progress:
            self.bar = tqdm(total=total, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True)
        if run.ranks.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.ranks.device)

    def after(self, step: int) -> None:
        cfg = self.cfg
        if self.bar is not None:
            self.bar.update(1)
        if step % cfg.log.every and step != self.total:
            return
        stats = self.meter.reduce()
        now = time.perf_counter()
        ips = (step - self.step_log) * cfg.data.batch_size / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, step
        self.logger.write({"step": step, "images": step * cfg.data.batch_size, **stats, "images_per_s": ips,
                           "peak_memory_bytes": peak_memory_bytes(self.run.ranks.device), "lr": self.lr,
                           **self.run.data.log_fields()})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{ips:.1f}",
                                 nonfinite=stats["nonfinite_steps"], refresh=False)
        limit = cfg.guard.max_consecutive_nonfinite
        if stats["max_consecutive_nonfinite"] >= limit:
            raise NonFiniteLoss(
                f"stopped at step {step}: the loss was NaN/inf for {stats['max_consecutive_nonfinite']} "
                f"consecutive steps (guard.max_consecutive_nonfinite={limit}); those steps were skipped, "
                f"the weights are the last good ones; last good checkpoint: "
                f"{self.run.last_checkpoint or 'none written yet'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


def _stop_early(run: Run, reason: str, step: int) -> Path | None:
    """A signal or the time limit: checkpoint (if this step has none), export (time limit only: a
    signal's grace period is short), tell, record. Returns the export, if any."""
    if not run.saved_at(step):
        run.save(step)
    exported = run.export() if reason == "time_limit" and run.ranks.lead else None
    if run.ranks.lead:
        why = ("signal received" if reason == "signal" else
               f"run.time_limit_minutes={run.cfg.run.time_limit_minutes:g} reached")
        print(f"\n[diti-fast] {why}: checkpoint {run.last_checkpoint} written at step {step}; "
              f"relaunch the same command to resume", flush=True)
        run_lock.write_status(run.dir, "stopped", reason=reason, step=step, exit_code=EXIT_SIGNAL,
                              checkpoint=str(run.last_checkpoint))
    return exported


# ============================================================================ command line

def build_parser(prog: str = "diti_fast/train.py") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train a DDPM (stage=ddpm) or DiTi (stage=diti).",
                                 epilog="Overrides: dotted.key=value, e.g. stage=ddpm optim.lr=2e-4 "
                                        "data.batch_size=64 deepspeed.zero_stage=2 (see docs/training.md)")
    ap.add_argument("--config", required=True,
                    help=f"a preset name ({', '.join(PRESETS)}) or a YAML file")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (with the learning rate it gives on WORLD_SIZE ranks) and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def main(argv: list[str] | None = None, prog: str = "diti_fast/train.py") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank instead of the env var
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.run.dir:  # the directory the run will use, shown and recorded instead of ''
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(resolve_run_dir(cfg))))
    if args.print_config:
        print(dump_yaml(cfg, int(os.environ.get("WORLD_SIZE", 1))), end="")
        return 0
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError, ckpt.ResumeError, DataError) as e:  # DataError: unusable data
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLoss as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except RankFailure as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return EXIT_RANK_FAILURE
    return 0 if result.status == "done" else EXIT_SIGNAL


if __name__ == "__main__":
    sys.exit(main())
