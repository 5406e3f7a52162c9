"""The training run's configuration: typed sections, presets, ``key=value`` overrides, validation.

A run is described by one YAML file (a preset under ``configs/`` or your own) plus command-line
overrides with dotted keys (``optim.lr=2e-4 data.batch_size=64 stage=ddpm``). Everything is checked
before any work starts: unknown keys, wrong types, and combinations that cannot work (a batch that
does not split over ranks × accumulation, ZeRO-3 with the EMA, a missing frozen DDPM, ...) raise a
:class:`~diti_fast.config.ConfigError` naming the dotted field. The resolved config is written to
``RUN/config.yaml``.

A config file may start from another with ``extends: NAME`` (a preset name or a path relative to
the file); mappings merge key by key, everything else is replaced.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..config import ConfigError, FastConfig, ModelConfig, from_dict, load_yaml, to_dict
from ..losses import MODES
from ..nn.encoder import ENCODER_SPECS



def _preset_files() -> dict[str, Path]:
    """Preset name -> file, from the package's presets (the repository's configs/ folder)."""
    import importlib.resources
    root = importlib.resources.files("diti_fast.presets")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".yaml")}


PRESETS = tuple(sorted(_preset_files()))


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
        w = where
        if self.data.batch_size < 1:
            raise ConfigError(f"{w}.data.batch_size must be >= 1")
        if self.deepspeed.grad_accum < 1:
            raise ConfigError(f"{w}.deepspeed.grad_accum must be >= 1")
        if self.data.batch_size % self.deepspeed.grad_accum:
            raise ConfigError(f"{w}.data.batch_size={self.data.batch_size} is not divisible by "
                              f"{w}.deepspeed.grad_accum={self.deepspeed.grad_accum}")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{w}.deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.deepspeed.zero_stage}")
        if self.deepspeed.zero_stage == 3:
            # ZeRO-3 partitions every parameter: the EMA, our weights-only per-rank checkpoints and
            # the export would need gathers; the models here (<= a few hundred M parameters) fit
            # on one GPU, where stage 2 already partitions gradients and optimiser state.
            raise ConfigError(f"{w}.deepspeed.zero_stage=3 cannot be combined with the EMA "
                              f"({w}.ema.decay={self.ema.decay}) and weights-only checkpoints of this "
                              "engine (stage 3 partitions the parameters themselves); use zero_stage 2")
        if self.run.max_images < self.data.batch_size:
            raise ConfigError(f"{w}.run.max_images={self.run.max_images} is less than one global batch "
                              f"({w}.data.batch_size={self.data.batch_size})")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError(f"{w}.ema.decay must be in [0, 1), got {self.ema.decay}")
        if self.ema.every < 1:
            raise ConfigError(f"{w}.ema.every must be >= 1")
        if self.optim.lr <= 0:
            raise ConfigError(f"{w}.optim.lr must be positive")
        if not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"{w}.optim.betas must lie in [0, 1), got {list(self.optim.betas)}")
        if self.optim.eps <= 0 or self.optim.weight_decay < 0 or self.optim.grad_clip < 0:
            raise ConfigError(f"{w}.optim: eps must be positive, weight_decay and grad_clip non-negative")
        if self.log.visuals_every < 0 or self.log.visuals_num < 1 or not \
                1 <= self.log.visuals_steps <= self.model.diffusion.timesteps:
            raise ConfigError(f"{w}.log: visuals_every must be >= 0, visuals_num >= 1 and visuals_steps in "
                              f"[1, {self.model.diffusion.timesteps}]")
        if self.log.every < 1 or self.log.t_buckets < 1:
            raise ConfigError(f"{w}.log.every and {w}.log.t_buckets must be >= 1")
        if self.checkpoint.every < 0 or self.checkpoint.keep < 1 or self.checkpoint.signal_sync_every < 1 \
                or self.checkpoint.export_every < 0:
            raise ConfigError(f"{w}.checkpoint: every/export_every must be >= 0, keep and "
                              "signal_sync_every >= 1")
        if self.run.time_limit_minutes < 0:
            raise ConfigError(f"{w}.run.time_limit_minutes must be >= 0 (0 = no limit)")
        if self.debug.step_sleep_s < 0:
            raise ConfigError(f"{w}.debug.step_sleep_s must be >= 0")
        if self.guard.max_consecutive_nonfinite < 1:
            raise ConfigError(f"{w}.guard.max_consecutive_nonfinite must be >= 1")
        if self.data.source == "shards" and not self.data.shards:
            raise ConfigError(f"{w}.data.shards is empty but {w}.data.source is 'shards'; give a shard "
                              "directory (one holding manifest.json), e.g. data.shards=runs/demo/data/train")
        if self.data.num_workers < 0 or self.data.shuffle_buffer < 1:
            raise ConfigError(f"{w}.data.num_workers must be >= 0 and data.shuffle_buffer >= 1")
        if self.data.num_samples < 0 or self.data.max_consecutive_skips < 1:
            raise ConfigError(f"{w}.data.num_samples must be >= 0 and data.max_consecutive_skips >= 1")
        if not (self.data.stream_timeout_s > 0 and self.data.stream_stall_s > 0):
            raise ConfigError(f"{w}.data.stream_timeout_s and data.stream_stall_s must be > 0 seconds, got "
                              f"{self.data.stream_timeout_s} and {self.data.stream_stall_s}")
        if self.stage == "diti":
            if not self.init.ddpm:
                raise ConfigError(f"{w}.init.ddpm is empty: stage 'diti' needs the frozen DDPM (a ddpm-stage "
                                  "run's export, RUN/export/ema.safetensors, or an original checkpoint)")
            size = ENCODER_SPECS[self.model.encoder.name][0]
            if self.data.image_size not in (0, size):
                raise ConfigError(f"{w}.data.image_size={self.data.image_size} but encoder "
                                  f"{w}.model.encoder.name={self.model.encoder.name!r} takes {size}x{size} images")
        if self.init.finetune:
            if self.stage != "ddpm":
                raise ConfigError(f"{w}.init.finetune=true applies to stage 'ddpm' (fine-tuning a DDPM from "
                                  f"{w}.init.ddpm); stage {self.stage!r} keeps init.ddpm frozen: drop init.finetune")
            if not self.init.ddpm:
                raise ConfigError(f"{w}.init.finetune=true but {w}.init.ddpm is empty: name the DDPM to start "
                                  "from (a ddpm-stage export, its run directory, or an original checkpoint .pt)")
        if self.diti.mode not in MODES:  # Literal already checks; kept in sync with losses.MODES
            raise ConfigError(f"{w}.diti.mode must be one of {MODES}")
        if self.fast.compile_mode == "reduce-overhead" and self.fast.compile:
            # CUDA graphs replay static buffers; the per-step metric accumulators and the EMA weight
            # are updated in place outside the graph, which reduce-overhead would silently alias.
            raise ConfigError(f"{w}.fast.compile_mode='reduce-overhead' (CUDA graphs of the forward only) is "
                              "not supported by this engine; fast.cuda_graph captures the whole step instead "
                              "(use compile_mode 'default' or 'max-autotune-no-cudagraphs')")

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
    if cfg.fast.attention == "xformers":
        import importlib.util
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("fast.attention='xformers' needs the xformers package; use sdpa")
    if cfg.log.tensorboard is True:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("log.tensorboard=true needs the tensorboard package (pip install "
                              "'diti-fast[tensorboard]'); use log.tensorboard=auto to log it only when installed")
    if cfg.debug.nan_rank >= world_size:
        raise ConfigError(f"debug.nan_rank={cfg.debug.nan_rank} but there are {world_size} ranks")
    if cfg.debug.fail_save_rank >= world_size:
        raise ConfigError(f"debug.fail_save_rank={cfg.debug.fail_save_rank} but there are {world_size} ranks")


# --------------------------------------------------------------------------- loading

def preset_path(name: str) -> Path | None:
    return _preset_files().get(name)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_config_file(spec: str | Path, _seen: tuple = ()) -> tuple[dict, str]:
    """(raw data with ``extends`` resolved, preset name) for a path or a preset name."""
    path = Path(spec)
    if not path.is_file():
        found = preset_path(str(spec)) if "/" not in str(spec) and not str(spec).endswith(".yaml") else None
        if found is None:
            raise ConfigError(f"config {spec}: no such file, and not a preset name (presets: {', '.join(PRESETS)})")
        path = found
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = load_yaml(path)
    parent = data.pop("extends", None)
    name = path.stem
    own_preset = data.get("preset")
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a preset name or a path, got {parent!r}")
        candidate = path.parent / parent
        base, _ = read_config_file(candidate if candidate.is_file() else parent, _seen + (path,))
        data = _merge(base, data)
    # The file's own name, not the one it extends (celeba64_original runs in runs/celeba64_original-*).
    data["preset"] = own_preset if own_preset is not None else name
    return data, name


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=2e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


_ROOT = "\x00"  # placeholder for the top level in messages: "optim.lr: ..." rather than "config.optim.lr"


# Keys this engine no longer reads, with what replaced them: a config that sets one is refused
# with the replacement named, rather than trained with a silently different learning rate.
_REMOVED = {
    ("optim", "scale_lr_by_batch"): "optim.scale_lr_by_batch was removed: the learning rate follows "
    "optim.lr_rule alone (global: the paper's lr for a global batch of 128 on any number of GPUs; "
    "per_gpu: the original code's lr x per-GPU batch / 32; none: lr as given; "
    "scale_lr_by_batch=false was lr_rule=none)",
}


def _check_removed(data: dict) -> None:
    for (section, key), msg in _REMOVED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(msg)
    optim = data.get("optim")
    if isinstance(optim, dict) and optim.get("lr_rule") == "auto":
        raise ConfigError("optim.lr_rule: 'auto' was removed (it meant per_gpu, none for pdae); choose "
                          "global (the paper's lr for a global batch of 128 on any number of GPUs), "
                          "per_gpu (the original code's rule) or none")


def build_config(data: dict, source: str = "config") -> TrainConfig:
    """Typed, validated TrainConfig; errors name the dotted field and the source (file + overrides)."""
    data = {k: v for k, v in data.items() if k != "effective"}  # written by dump_yaml, derived
    try:
        _check_removed(data)
        return from_dict(TrainConfig, data, _ROOT)
    except ConfigError as e:
        msg = str(e).replace(_ROOT + ".", "").replace(_ROOT, "config")
        raise ConfigError(f"{msg} [in {source}]") from None


def load_config(spec: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a config file or preset, apply ``key=value`` overrides, validate."""
    data, name = read_config_file(spec) if spec is not None else ({}, "config")
    data = apply_overrides(data, overrides or [])
    source = f"{spec}" + (" + command-line overrides" if overrides else "")
    return build_config(data, source)


def resolved_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)


def effective(cfg: TrainConfig, world_size: int) -> dict:
    """What the config resolves to on ``world_size`` ranks (recorded in RUN/config.yaml)."""
    return {"world_size": world_size, "lr_rule": cfg.lr_rule(), "lr": cfg.lr(world_size),
            "micro_batch": cfg.micro_batch(world_size)}


def dump_yaml(cfg: TrainConfig, world_size: int | None = None) -> str:
    """The resolved config; with ``world_size`` also an ``effective:`` section (the learning rate the
    run trains with, its rule, the micro-batch), which loading ignores."""
    data = resolved_dict(cfg)
    if world_size is not None:
        data["effective"] = effective(cfg, world_size)
    return yaml.safe_dump(data, sort_keys=False)


# Keys that may change between a run and its resumption: how long, how it logs, how it saves.
# deepspeed.zero_stage: an elastic checkpoint (checkpoint.elastic) converts its optimiser state.
RESUME_MUTABLE = ("preset", "run.max_images", "run.dir", "run.threads", "run.time_limit_minutes", "data.num_workers",
                  "data.verify", "data.max_consecutive_skips", "data.stream_timeout_s", "data.stream_stall_s", "log.",
                  "checkpoint.", "debug.", "fast.compile", "fast.compile_mode", "fast.cuda_graph", "guard.", "init.ddpm",
                  "deepspeed.zero_stage", "effective.")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resolved_lr_rule(flat: dict) -> str:
    """The lr rule a flattened resolved config trains with. Configs saved by earlier versions of this
    engine may hold lr_rule 'auto' (per_gpu, none for pdae) or only scale_lr_by_batch: their
    meaning then is what such a run trained with, compared on resume instead of the raw keys."""
    rule = flat.get("optim.lr_rule", "auto")
    if rule != "auto":
        return rule
    if flat.get("optim.scale_lr_by_batch", True) is False:
        return "none"
    return "none" if flat.get("stage") == "diti" and flat.get("diti.mode") == "pdae" else "per_gpu"


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between the saved and the new resolved config."""
    a, b = flatten(saved), flatten(current)
    for f in (a, b):
        f["optim.lr_rule"] = _resolved_lr_rule(f)
        f.pop("optim.scale_lr_by_batch", None)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(RESUME_MUTABLE) or k in RESUME_MUTABLE:
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs
