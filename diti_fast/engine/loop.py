"""diti-fast's training loop: DDPM pre-training and DiTi under DeepSpeed, readable top to bottom.

Launched through ``diti_fast/train.py`` (the script the launchers run) or ``diti-fast train``:

    deepspeed --num_gpus 8 diti_fast/train.py --config celeba64
    torchrun --nproc_per_node 8 diti_fast/train.py --config my_run.yaml
    python -m diti_fast.train --config shapes32 stage=ddpm          # one process, CPU or one GPU
    diti-fast train --config shapes32 optim.lr=2e-4 run.dir=runs/x   # the console script

Overrides are ``dotted.key=value`` (see docs/training.md). The run directory holds the resolved
``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-XXXXXXXX/`` and ``export/ema.safetensors``;
relaunching the same command resumes from the latest complete checkpoint.

Reading order: ``train()`` sets up (config checks, process group, run directory, models, frozen
DDPM, DeepSpeed, resume) and then runs the loop. Helpers in this package, one job each:
``objective.py`` (models + loss + frozen DDPM), ``microbatches.py`` (micro-batches, resumable),
``distributed.py`` (process group, DeepSpeed config, optimiser), ``checkpoints.py`` (atomic
training checkpoints), ``stopping.py`` (signals, time limit), ``ema.py``, ``metrics.py``,
``noise.py`` (t and ε by sample index), ``run_config.py`` (the run config and presets). Per optimiser step:
micro-batches -> forward/backward (t and ε keyed by global sample index) -> one all-reduced
"loss finite" flag on the device -> optimiser step (skipped on the device when not finite) -> EMA
-> device-side metrics; host syncs only at log / checkpoint / signal-agreement steps.
"""
from __future__ import annotations

import os
import sys

import argparse
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from diti_fast.config import ConfigError
from diti_fast.data.errors import DataError
from diti_fast.engine import checkpoints as ckpt
from diti_fast.engine import run_lock
from diti_fast.engine.checkpoints import checkpoint_step, load_checkpoint, save_checkpoint
from diti_fast.engine.elastic import check_internals
from diti_fast.engine.distributed import (RankFailure, base_optimizer, deepspeed_config, make_optimizer,
                                          setup_distributed)
from diti_fast.engine.ema import EMA
from diti_fast.engine.graph_step import GraphStep, plan_step
from diti_fast.engine.metrics import Logger, Meter, peak_memory_bytes
from diti_fast.engine.microbatches import MicroBatches, check_shards, to_model_input
from diti_fast.engine.objective import Objective, check_init_ddpm, load_frozen_ddpm, load_start_ddpm
from diti_fast.engine.config_files import PRESETS, dump_yaml, load_config, resolved_dict
from diti_fast.engine.resume_rules import resume_conflicts
from diti_fast.engine.run_config import TrainConfig, validate_runtime
from diti_fast.engine.sample_log import SampleLog
from diti_fast.engine.stopping import StopSignal, hold_for_signal, stop_reason
from diti_fast.engine.visuals import Visuals
from diti_fast.files import write_text_atomic
from diti_fast.losses import LossOut
from diti_fast.weights import CheckpointError, export_path, save_export

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


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, rank: int, world: int) -> tuple[Path, dict] | None:
    """Collective. The run-directory lock (rank 0), the check that every rank sees the same
    directory, config conflicts vs. a previous launch, the checkpoint to resume from (newest that
    verifies); writes config.yaml. An error on any rank is raised on all of them."""
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


def export(cfg: TrainConfig, run_dir: Path, objective: Objective, ema: EMA) -> Path:
    """EMA weights + resolved config as safetensors (what evaluation's load_export reads): the live
    modules' state dicts with their trainable entries swapped for the EMA, no model rebuilt."""
    parts = ("unet",) if cfg.stage == "ddpm" else ("encoder", "decoder")
    states = {name: ema.full_state_dict(getattr(objective, name), f"{name}.") for name in parts}
    return save_export(export_path(run_dir), cfg.stage, cfg.model, resolved_dict(cfg), **states)


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
    rank, world, device = setup_distributed(cfg)
    autocast = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        if autocast:
            torch.backends.cuda.matmul.allow_tf32 = True

    run_dir = resolve_run_dir(cfg)
    found = prepare_run_dir(cfg, run_dir, rank, world)
    latest = found[0] if found else None

    # -- models (same init on every rank), frozen DDPM, DeepSpeed
    torch.manual_seed(cfg.run.seed)
    objective = Objective(cfg, device, autocast)
    frozen_from = None
    if cfg.stage == "diti" and latest is None:  # a resumed run gets it from the checkpoint
        frozen_from = load_frozen_ddpm(objective.decoder, cfg)
    start_from = None
    if cfg.stage == "ddpm" and cfg.init.finetune and latest is None:  # fine-tuning; a resume has its weights
        start_from = load_start_ddpm(objective.unet, cfg)
    objective.to(device).train()
    trainable = objective.trainable()
    lr = cfg.lr(world)
    plan = plan_step(cfg, device)  # the whole step as one CUDA graph, where it can be
    opt = make_optimizer([p for _, p in trainable], cfg, lr, device, capturable=plan.capture)
    import deepspeed
    engine, *_ = deepspeed.initialize(model=objective, optimizer=opt, config=deepspeed_config(cfg, world))
    check_internals(engine)  # a DeepSpeed whose private ZeRO state moved fails now, by name
    opt = base_optimizer(engine)
    if cfg.deepspeed.zero_stage == 0:
        objective.channels_last_weights()  # after DeepSpeed's start-up (see Objective)
    ema = EMA(trainable, cfg.ema.decay)
    if cfg.fast.compile:
        objective.compile(mode=cfg.fast.compile_mode)
    # Dropout draws from the per-rank generator (t and ε do not): seed it per rank.
    torch.manual_seed(cfg.run.seed * 1_000_003 + rank)

    step, position = 0, None
    if latest is not None:
        step, position = load_checkpoint(cfg, latest, found[1], engine, ema, rank, world, micro)
    data = MicroBatches(cfg, rank, world, micro, size, position, device)
    total = cfg.total_steps()
    meter = Meter(cfg.log.t_buckets, cfg.model.diffusion.timesteps, device)
    logger = Logger(run_dir, rank == 0, cfg.log.tensorboard, cfg.log.t_buckets, cfg.model.diffusion.timesteps)
    visuals = Visuals(cfg, run_dir, rank == 0, logger.tb)  # grids every log.visuals_every steps (0: off)
    stop = StopSignal(cfg.checkpoint.on_signal, world)
    samples = SampleLog(run_dir, rank, world) if cfg.debug.sample_log else None
    graph = (GraphStep(plan, cfg, objective, opt, ema, meter, data, rank, world, micro, device, step)
             if plan.graph_safe else None)
    bar = None
    if rank == 0 and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=f"{cfg.stage}", unit="step", dynamic_ncols=True)
    if rank == 0:
        n_train = sum(p.numel() for _, p in trainable)
        n_all = sum(p.numel() for p in objective.parameters())
        print(f"[diti-fast] stage={cfg.stage} run={run_dir} ranks={world} device={device} "
              f"precision={'bf16-autocast' if autocast else 'fp32'} zero={cfg.deepspeed.zero_stage} "
              f"batch={cfg.data.batch_size} (micro {micro} x accum {cfg.deepspeed.grad_accum} x {world}) "
              f"lr={lr:g} (optim.lr_rule={cfg.lr_rule()}, optim.lr={cfg.optim.lr:g}) params={n_train / 1e6:.2f}M trainable / {n_all / 1e6:.2f}M "
              f"steps={step}->{total}" + (f" resumed from {latest}" if latest else "")
              + (f" frozen DDPM from {frozen_from}" if frozen_from else "")
              + (f" fine-tuning the DDPM from {start_from}" if start_from else "")
              + (" cuda-graph" if plan.capture else ""), flush=True)
        if plan.reason:
            print(f"[diti-fast] {plan.reason}", flush=True)

    nan = torch.tensor(float("nan"), device=device)
    nan_steps = set(cfg.debug.nan_at_steps)
    local = cfg.data.batch_size // world
    last_ckpt, result_export = latest, None
    t_log, step_log, status = time.perf_counter(), step, "done"
    deadline = time.monotonic() + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < total:
            # ---- one optimiser step: grad_accum micro-batches on every rank
            if samples is not None:  # debug.sample_log: the global sample indices this step trains
                for m in range(cfg.deepspeed.grad_accum):
                    samples.add(step + 1, step * cfg.data.batch_size + rank * local + m * micro, micro)
            if graph is not None:  # the same step, graph-safe and captured (engine/graph_step.py)
                finite = graph.step(step)
            else:
                finite = torch.ones((), dtype=torch.bool, device=device)
                for m in range(cfg.deepspeed.grad_accum):
                    x0 = to_model_input(data.next(m), device)
                    first = step * cfg.data.batch_size + rank * local + m * micro  # global sample index
                    index = torch.arange(first, first + micro, device=device)
                    out, t = engine(x0, index)
                    if step + 1 in nan_steps and cfg.debug.nan_rank in (-1, rank):
                        out = LossOut(out.loss * nan, out.per_sample * nan,
                                      out.buckets and (out.buckets[0] * nan, out.buckets[1]))
                    finite &= torch.isfinite(out.loss.detach())
                    meter.add_samples(out.per_sample, t, out.buckets)
                    engine.backward(out.loss)
                    if m == cfg.deepspeed.grad_accum - 1:
                        # A NaN on any rank poisons the averaged gradient everywhere: agree on the
                        # flag (an async device collective, not a host sync), then let the fused Adam
                        # skip the update on the device.
                        if world > 1:
                            flag = finite.to(torch.int32)
                            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                            finite = flag.bool()
                        opt.found_inf = (~finite).to(torch.float32)
                    engine.step()
            step += 1
            if graph is None and step % cfg.ema.every == 0:
                n = step // cfg.ema.every - 1  # updates done before this one
                decay = min(cfg.ema.decay, (1 + n) / (10 + n)) if cfg.ema.warmup else cfg.ema.decay
                ema.update(finite * (1.0 - decay))  # weight 0 on a skipped step: the EMA stays put
            if graph is None:
                meter.add_step(finite)
            if visuals.enabled:
                visuals.maybe(step, objective, ema, x0 if graph is None else to_model_input(graph.raw[0], device))
            if bar is not None:
                bar.update(1)

            # ---- host-side bookkeeping (syncs only here)
            if step % cfg.log.every == 0 or step == total:
                stats = meter.reduce()
                now = time.perf_counter()
                ips = (step - step_log) * cfg.data.batch_size / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                record = {"step": step, "images": step * cfg.data.batch_size, **stats, "images_per_s": ips,
                          "peak_memory_bytes": peak_memory_bytes(device), "lr": lr, **data.log_fields()}
                logger.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{ips:.1f}",
                                    nonfinite=stats["nonfinite_steps"], refresh=False)
                if stats["max_consecutive_nonfinite"] >= cfg.guard.max_consecutive_nonfinite:
                    raise NonFiniteLoss(
                        f"stopped at step {step}: the loss was NaN/inf for "
                        f"{stats['max_consecutive_nonfinite']} consecutive steps "
                        f"(guard.max_consecutive_nonfinite={cfg.guard.max_consecutive_nonfinite}); those "
                        f"steps were skipped, the weights are the last good ones; last good checkpoint: "
                        f"{last_ckpt or 'none written yet'}")
            if cfg.debug.crash_at_step and step == cfg.debug.crash_at_step:
                raise SystemExit(99)
            if cfg.debug.signal_at_step and step == cfg.debug.signal_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
            if cfg.debug.hold_after_step and step == cfg.debug.hold_after_step:
                hold_for_signal(stop, world)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                if float(meter.consecutive) == 0:  # never checkpoint in the middle of a bad streak
                    last_ckpt = save_checkpoint(cfg, run_dir, engine, ema, data, step, rank, world)
                elif rank == 0:
                    print(f"[diti-fast] step {step}: checkpoint skipped (non-finite streak)", flush=True)
            if cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0 and rank == 0:
                export(cfg, run_dir, objective, ema)
            reason = stop_reason(stop, deadline, step, world, cfg.checkpoint.signal_sync_every)
            if reason is not None and step < total:
                status = reason
                if checkpoint_step(last_ckpt) != step:
                    last_ckpt = save_checkpoint(cfg, run_dir, engine, ema, data, step, rank, world)
                if reason == "time_limit" and rank == 0:  # a signal's grace period is short: no export
                    result_export = export(cfg, run_dir, objective, ema)
                if rank == 0:
                    why = ("signal received" if reason == "signal" else
                           f"run.time_limit_minutes={cfg.run.time_limit_minutes:g} reached")
                    print(f"\n[diti-fast] {why}: checkpoint {last_ckpt} written at step {step}; "
                          f"relaunch the same command to resume", flush=True)
                    run_lock.write_status(run_dir, "stopped", reason=reason, step=step, exit_code=EXIT_SIGNAL,
                                          checkpoint=str(last_ckpt))
                break
    finally:
        stop.close()
        if samples is not None:
            samples.close()
        if bar is not None:
            bar.close()
        logger.close()

    result = TrainResult(status, step, run_dir, export=result_export, last_checkpoint=last_ckpt)
    if status == "done":
        if checkpoint_step(last_ckpt) != step:
            result.last_checkpoint = save_checkpoint(cfg, run_dir, engine, ema, data, step, rank, world)
        if rank == 0:
            result.export = export(cfg, run_dir, objective, ema)
            print(f"[diti-fast] done: {step} steps, {step * cfg.data.batch_size} images; EMA weights in "
                  f"{result.export}", flush=True)
            run_lock.write_status(run_dir, "done", step=step, exit_code=0, checkpoint=str(result.last_checkpoint))
        dist.barrier()
    return result


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
