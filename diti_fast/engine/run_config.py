"""The training run's configuration: typed sections and their validation.

Everything is checked before any work starts: unknown keys, wrong types, and combinations that
cannot work (a batch that does not split over ranks x accumulation, ZeRO-3 with the EMA, a missing
frozen DDPM, ...) raise a :class:`~diti_fast.config.ConfigError` naming the dotted field.
:meth:`TrainConfig.lr` is the one place the learning-rate rule is written. Reading files and
overrides is ``config_files.py``; what may change on resume is ``resume_rules.py``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, FastConfig, ModelConfig
from ..losses import MODES
from ..nn.encoder import ENCODER_SPECS


@dataclass
class RunSection:
    dir: str = ""                  # run directory; "" = runs/<preset>-<stage>
    seed: int = 0                  # keys t, ε (per global sample index), data order, init
    max_images: int = 38_000_000   # training length in images, as the original's max_images
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU (CPU bf16 is slow)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int = 0               # torch.set_num_threads on CPU; 0 = torch's default
    # Wall-clock budget of one launch (e.g. a cluster job's limit, the demo's 15 minutes): when it
    # is spent the run writes a checkpoint and an export and exits with status 75; relaunch to go
    # on towards max_images. 0 = no limit.
    time_limit_minutes: float = 0.0


@dataclass
class DataSection:
    # shards: WebDataset shards via diti_fast.data.train_loader. fixed: one in-memory global batch
    # drawn from the seed, reused every step and split by rank (tests, benchmarks: the global
    # batch is the same whatever the number of ranks).
    source: Literal["shards", "fixed"] = "shards"
    # A shard directory holding manifest.json, a manifest path or URL (http(s)://…/manifest.json),
    # a brace pattern or a list of paths/URLs (pipe:CMD, http(s)://, file:); see docs/data.md.
    shards: str | list[str] = ""
    num_samples: int = 0           # epoch size for a set without a manifest; 0 = one counting pass
    verify: bool = False           # sha256 of every shard against the manifest before training
    # An image of another size than the model's: "resize" (center crop + resample filter), "skip"
    # (skipped and counted), "error" (stop with the shard and sample named).
    size_mismatch: Literal["resize", "skip", "error"] = "resize"
    resample: Literal["bicubic", "bilinear", "lanczos", "box", "nearest"] = "bicubic"
    max_consecutive_skips: int = 1000  # a stream this many samples in a row without a usable one stops
    # An http(s) shard's download (curl) gives up after this many seconds in all, or after
    # stream_stall_s below 1 KiB/s (a server that stalls without closing); the shard counts as bad.
    stream_timeout_s: float = 3600.0
    stream_stall_s: float = 60.0
    batch_size: int = 128          # GLOBAL batch per optimiser step (ranks × accumulation × micro)
    num_workers: int = 4
    hflip: bool = True
    shuffle_buffer: int = 1000
    strict: bool = False           # the loader's strict mode: a corrupt sample is an error, not a skip
    image_size: int = 0            # 0: the encoder's size (diti) / the manifest's (ddpm); 32 for fixed ddpm


@dataclass
class EngineFastConfig(FastConfig):
    """FastConfig (attention backend, fused kernels, channels_last) plus torch.compile and the
    whole-step CUDA graph."""
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # The whole optimiser step captured once and replayed (engine/graph_step.py). "auto": on CUDA
    # with ZeRO-0 and no gradient clipping, else DeepSpeed's eager step (the log says why); true:
    # the same, and on a CPU the graph-safe step uncaptured; false: always DeepSpeed's step.
    cuda_graph: bool | Literal["auto"] = "auto"


@dataclass
class DitiSection:
    mode: Literal["base", "stop_grad", "dual", "pdae"] = "base"


@dataclass
class InitSection:
    # Frozen DDPM for stage diti: our export (RUN/export/ema.safetensors of a ddpm-stage run, or
    # that run's directory) or the original's checkpoint ({"ema_denoise_fn": ...}).
    ddpm: str = ""
    ddpm_use_ema: bool = True      # original format: ema_denoise_fn (true) or denoise_fn (false)
    # stage ddpm: start the DDPM from init.ddpm's weights (fine-tuning) instead of a random init. A
    # flag rather than init.ddpm alone: the presets name init.ddpm for their diti stage.
    finetune: bool = False


@dataclass
class OptimSection:
    """Plain Adam as the original (not AdamW): betas, eps, no weight decay, no schedule."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # How optim.lr scales with the batch (see TrainConfig.lr and docs/training.md):
    #   global:  lr · (global batch) / 128: the paper's lr for its 128 images whatever the number of
    #            GPUs (the presets that reproduce the paper);
    #   per_gpu: the original code's lr · (per-GPU batch) / 32, per-GPU batch = global batch / ranks;
    #            the paper's 4 GPUs x 32 keep lr, 8 GPUs x 16 halve it (the *_original presets);
    #   none:    lr as given (the original's PDAE trainer; the pdae presets).
    lr_rule: Literal["global", "per_gpu", "none"] = "global"
    grad_clip: float = 0.0         # 0 = none (the original); >0 makes DeepSpeed compute the norm (a sync)


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0            # 0, 1, 2 (3 is refused: see validate)
    grad_accum: int = 1            # micro-steps per optimiser step


@dataclass
class EmaSection:
    decay: float = 0.9999
    every: int = 1                 # steps between EMA updates
    # decay_n = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's num_updates rule), so a
    # short run's EMA is not mostly its random initial weights (0.999^300 = 0.74 of it). Off in
    # the original-hyper-parameter presets.
    warmup: bool = False


@dataclass
class LogSection:
    every: int = 100               # steps between metric reductions (the only host syncs)
    t_buckets: int = 10            # loss per equal-width range of t
    progress: bool = True          # tqdm bar on rank 0
    # Training-time visuals (engine/visuals.py): every N steps a grid of reconstructions (diti) and
    # DDPM samples into RUN/visuals/ and TensorBoard; 0 = off. The original: 36 images, DDIM 100.
    visuals_every: int = 0
    visuals_num: int = 36
    visuals_steps: int = 100       # DDIM steps (the original's ddim100); fewer make CPU runs affordable
    # "auto": TensorBoard events when the tensorboard package is installed; true: required (an error
    # before any work when it is missing); false: never.
    tensorboard: bool | Literal["auto"] = "auto"


@dataclass
class CheckpointSection:
    every: int = 5000              # steps; 0 = only at the end and on a signal
    keep: int = 3                  # keep the last K checkpoints
    resume: bool = True            # resume automatically from the latest complete checkpoint
    on_signal: bool = True         # SIGTERM/SIGINT: write a checkpoint, exit with status 75
    # multi-rank: steps between agreeing on a pending signal. The agreement is a 2-integer gloo
    # all-reduce of host values (no device sync), so every step is cheap and leaves a launcher's
    # grace period (30 s under torchrun and deepspeed) to the checkpoint.
    signal_sync_every: int = 1
    # Also write optimizer-full.pt (the Adam state gathered over ranks, per parameter name) so the
    # run can resume on another number of ranks or ZeRO stage; one all-reduce per checkpoint.
    elastic: bool = True
    export_every: int = 0          # steps between EMA exports besides the final one; 0 = end only


@dataclass
class GuardSection:
    # A step whose loss is NaN/inf on any rank is skipped (optimiser, EMA untouched) and counted;
    # after this many in a row the run stops with an error, keeping the last good checkpoint.
    # Checked where the engine syncs anyway (every log.every steps).
    max_consecutive_nonfinite: int = 20


@dataclass
class DebugSection:
    """Test hooks; all off by default."""
    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps (1-based)
    nan_rank: int = -1             # only on this rank (-1: all)
    signal_at_step: int = 0        # send SIGTERM to this process after this step
    crash_at_step: int = 0         # raise SystemExit(99) after this step, no checkpoint (a crash)
    fail_save_rank: int = -1       # this rank's checkpoint write raises OSError(ENOSPC) (disk full)
    sample_log: bool = False       # append the global sample indices each rank trains to RUN/debug/
    step_sleep_s: float = 0.0      # sleep after every step (gives signal tests a window)
    hold_after_step: int = 0       # after this step, wait (every rank, up to 10 min) for a stop signal


@dataclass
class TrainConfig:
    stage: Literal["ddpm", "diti"] = "diti"
    preset: str = ""               # informational: the preset the file came from
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    fast: EngineFastConfig = field(default_factory=EngineFastConfig)
    diti: DitiSection = field(default_factory=DitiSection)
    init: InitSection = field(default_factory=InitSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    ema: EmaSection = field(default_factory=EmaSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    guard: GuardSection = field(default_factory=GuardSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def validate(self, where: str = "config") -> None:
        """Checks that need no runtime facts (world size, device): run by from_dict."""
        for check in (_check_batch, _check_optim, _check_schedule, _check_data, _check_stage, _check_fast):
            check(self, where)

    # -- facts derived from the config
    def image_size(self, manifest_size: int | None = None) -> int:
        if self.data.image_size:
            return self.data.image_size
        if self.stage == "diti":
            return ENCODER_SPECS[self.model.encoder.name][0]
        return manifest_size or 32

    def micro_batch(self, world_size: int) -> int:
        return self.data.batch_size // (world_size * self.deepspeed.grad_accum)

    def lr_rule(self) -> str:
        return self.optim.lr_rule

    def lr(self, world_size: int) -> float:
        rule = self.lr_rule()
        if rule == "per_gpu":
            return self.optim.lr * (self.data.batch_size // world_size) / 32.0
        if rule == "global":
            return self.optim.lr * self.data.batch_size / 128.0
        return self.optim.lr

    def total_steps(self) -> int:
        return -(-self.run.max_images // self.data.batch_size)  # ceil: the original stops at >= max


# -- validate's checks, one topic each; ``w`` is the prefix of the dotted keys in messages

def _check_batch(c: TrainConfig, w: str) -> None:
    if c.data.batch_size < 1:
        raise ConfigError(f"{w}.data.batch_size must be >= 1")
    if c.deepspeed.grad_accum < 1:
        raise ConfigError(f"{w}.deepspeed.grad_accum must be >= 1")
    if c.data.batch_size % c.deepspeed.grad_accum:
        raise ConfigError(f"{w}.data.batch_size={c.data.batch_size} is not divisible by "
                          f"{w}.deepspeed.grad_accum={c.deepspeed.grad_accum}")
    if c.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{w}.deepspeed.zero_stage must be 0, 1, 2 or 3, got {c.deepspeed.zero_stage}")
    if c.deepspeed.zero_stage == 3:
        # ZeRO-3 partitions every parameter: the EMA, our weights-only per-rank checkpoints and
        # the export would need gathers; the models here (<= a few hundred M parameters) fit
        # on one GPU, where stage 2 already partitions gradients and optimiser state.
        raise ConfigError(f"{w}.deepspeed.zero_stage=3 cannot be combined with the EMA "
                          f"({w}.ema.decay={c.ema.decay}) and weights-only checkpoints of this "
                          "engine (stage 3 partitions the parameters themselves); use zero_stage 2")
    if c.run.max_images < c.data.batch_size:
        raise ConfigError(f"{w}.run.max_images={c.run.max_images} is less than one global batch "
                          f"({w}.data.batch_size={c.data.batch_size})")


def _check_optim(c: TrainConfig, w: str) -> None:
    if not 0.0 <= c.ema.decay < 1.0:
        raise ConfigError(f"{w}.ema.decay must be in [0, 1), got {c.ema.decay}")
    if c.ema.every < 1:
        raise ConfigError(f"{w}.ema.every must be >= 1")
    if c.optim.lr <= 0:
        raise ConfigError(f"{w}.optim.lr must be positive")
    if not all(0.0 <= b < 1.0 for b in c.optim.betas):
        raise ConfigError(f"{w}.optim.betas must lie in [0, 1), got {list(c.optim.betas)}")
    if c.optim.eps <= 0 or c.optim.weight_decay < 0 or c.optim.grad_clip < 0:
        raise ConfigError(f"{w}.optim: eps must be positive, weight_decay and grad_clip non-negative")


def _check_schedule(c: TrainConfig, w: str) -> None:
    """Logging, checkpoints, limits, guards and test hooks."""
    if c.log.visuals_every < 0 or c.log.visuals_num < 1 or not \
            1 <= c.log.visuals_steps <= c.model.diffusion.timesteps:
        raise ConfigError(f"{w}.log: visuals_every must be >= 0, visuals_num >= 1 and visuals_steps in "
                          f"[1, {c.model.diffusion.timesteps}]")
    if c.log.every < 1 or c.log.t_buckets < 1:
        raise ConfigError(f"{w}.log.every and {w}.log.t_buckets must be >= 1")
    if c.checkpoint.every < 0 or c.checkpoint.keep < 1 or c.checkpoint.signal_sync_every < 1 \
            or c.checkpoint.export_every < 0:
        raise ConfigError(f"{w}.checkpoint: every/export_every must be >= 0, keep and "
                          "signal_sync_every >= 1")
    if c.run.time_limit_minutes < 0:
        raise ConfigError(f"{w}.run.time_limit_minutes must be >= 0 (0 = no limit)")
    if c.debug.step_sleep_s < 0:
        raise ConfigError(f"{w}.debug.step_sleep_s must be >= 0")
    if c.guard.max_consecutive_nonfinite < 1:
        raise ConfigError(f"{w}.guard.max_consecutive_nonfinite must be >= 1")


def _check_data(c: TrainConfig, w: str) -> None:
    d = c.data
    if d.source == "shards" and not d.shards:
        raise ConfigError(f"{w}.data.shards is empty but {w}.data.source is 'shards'; give a shard "
                          "directory (one holding manifest.json), e.g. data.shards=runs/demo/data/train")
    if d.num_workers < 0 or d.shuffle_buffer < 1:
        raise ConfigError(f"{w}.data.num_workers must be >= 0 and data.shuffle_buffer >= 1")
    if d.num_samples < 0 or d.max_consecutive_skips < 1:
        raise ConfigError(f"{w}.data.num_samples must be >= 0 and data.max_consecutive_skips >= 1")
    if not (d.stream_timeout_s > 0 and d.stream_stall_s > 0):
        raise ConfigError(f"{w}.data.stream_timeout_s and data.stream_stall_s must be > 0 seconds, got "
                          f"{d.stream_timeout_s} and {d.stream_stall_s}")


def _check_stage(c: TrainConfig, w: str) -> None:
    """The stage against the frozen / starting DDPM, the encoder's image size and the DiTi mode."""
    if c.stage == "diti":
        if not c.init.ddpm:
            raise ConfigError(f"{w}.init.ddpm is empty: stage 'diti' needs the frozen DDPM (a ddpm-stage "
                              "run's export, RUN/export/ema.safetensors, or an original checkpoint)")
        size = ENCODER_SPECS[c.model.encoder.name][0]
        if c.data.image_size not in (0, size):
            raise ConfigError(f"{w}.data.image_size={c.data.image_size} but encoder "
                              f"{w}.model.encoder.name={c.model.encoder.name!r} takes {size}x{size} images")
    if c.init.finetune:
        if c.stage != "ddpm":
            raise ConfigError(f"{w}.init.finetune=true applies to stage 'ddpm' (fine-tuning a DDPM from "
                              f"{w}.init.ddpm); stage {c.stage!r} keeps init.ddpm frozen: drop init.finetune")
        if not c.init.ddpm:
            raise ConfigError(f"{w}.init.finetune=true but {w}.init.ddpm is empty: name the DDPM to start "
                              "from (a ddpm-stage export, its run directory, or an original checkpoint .pt)")
    if c.diti.mode not in MODES:  # Literal already checks; kept in sync with losses.MODES
        raise ConfigError(f"{w}.diti.mode must be one of {MODES}")


def _check_fast(c: TrainConfig, w: str) -> None:
    if c.fast.compile_mode == "reduce-overhead" and c.fast.compile:
        # CUDA graphs replay static buffers; the per-step metric accumulators and the EMA weight
        # are updated in place outside the graph, which reduce-overhead would silently alias.
        raise ConfigError(f"{w}.fast.compile_mode='reduce-overhead' (CUDA graphs of the forward only) is "
                          "not supported by this engine; fast.cuda_graph captures the whole step instead "
                          "(use compile_mode 'default' or 'max-autotune-no-cudagraphs')")
    # run.device 'auto' is decided at launch: validate_runtime checks it there.
    clash = _autotune_in_step_graph(c, c.run.device == "cuda", w)
    if clash:
        raise ConfigError(clash)


def _autotune_in_step_graph(c: TrainConfig, on_cuda: bool, w: str = "") -> str | None:
    """The error when compile mode 'max-autotune' meets the whole-step CUDA graph, else None.

    Inductor's max-autotune records CUDA graphs of its own, which would then be captured inside the
    graph of the whole step (fast.cuda_graph); nested captures are not supported."""
    if not (c.fast.compile and c.fast.compile_mode == "max-autotune"):
        return None
    if c.fast.cuda_graph is True or (c.fast.cuda_graph == "auto" and on_cuda):
        p = f"{w}." if w else ""
        return (f"{p}fast.compile_mode='max-autotune' cannot be combined with {p}fast.cuda_graph="
                f"{str(c.fast.cuda_graph).lower()}{' on CUDA' if c.fast.cuda_graph == 'auto' else ''}: max-autotune "
                "records its own CUDA graphs, which would nest inside the capture of the whole step; use "
                "fast.compile_mode=max-autotune-no-cudagraphs, or fast.cuda_graph=false")
    return None


def validate_runtime(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    """Checks that need the launch facts; run before any model is built."""
    b, a = cfg.data.batch_size, cfg.deepspeed.grad_accum
    if b % (world_size * a):
        raise ConfigError(f"data.batch_size={b} is not divisible by ranks x accumulation = {world_size} x "
                          f"deepspeed.grad_accum={a} = {world_size * a}; choose a batch size that is a "
                          f"multiple of {world_size * a}")
    if cfg.run.device == "cuda" and device_type != "cuda":
        raise ConfigError("run.device='cuda' but no CUDA device is available")
    if cfg.fast.attention == "xformers" and device_type != "cuda":
        raise ConfigError("fast.attention='xformers' has no CPU kernels; use fast.attention=sdpa on CPU")
    if cfg.fast.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("fast.attention='xformers' needs the xformers package; use sdpa")
    clash = _autotune_in_step_graph(cfg, device_type == "cuda")
    if clash:
        raise ConfigError(clash)
    if cfg.log.tensorboard is True:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("log.tensorboard=true needs the tensorboard package (pip install "
                              "'diti-fast[tensorboard]'); use log.tensorboard=auto to log it only when installed")
    if cfg.debug.nan_rank >= world_size:
        raise ConfigError(f"debug.nan_rank={cfg.debug.nan_rank} but there are {world_size} ranks")
    if cfg.debug.fail_save_rank >= world_size:
        raise ConfigError(f"debug.fail_save_rank={cfg.debug.fail_save_rank} but there are {world_size} ranks")

