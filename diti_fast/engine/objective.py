"""What DeepSpeed wraps: the models and the loss of one stage, and the frozen DDPM's loading.

``Objective.forward(x0, global_index)`` draws t and ε from (seed, global sample index), runs the
stage's loss (the plain ε-loss for ``ddpm``, DiTi's masked shift loss for ``diti``) under bf16
autocast when asked, and returns (loss, per-sample loss, t).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from diti_fast.config import ConfigError, channels_last_on, comparable, to_dict
from diti_fast.diffusion import make_schedule
from diti_fast.engine import noise
from diti_fast.engine.run_config import TrainConfig
from diti_fast.losses import ddpm_objective, diti_objective
from diti_fast.masks import TimestepMasks
from diti_fast.nn import TRAINABLE, build_decoder, build_encoder, build_unet, set_channels_last
from diti_fast.nn.blocks import to_layout
from diti_fast.original_configs import check_ddpm_config
from diti_fast.weights import (CheckpointError, export_path, load_original_ddpm, load_state, load_weights,
                               split_prefixed)


class Objective(nn.Module):
    """What DeepSpeed wraps: the models plus the loss, forward(x0, global_index) -> (LossOut, t).

    t and ε are drawn inside forward from (seed, global sample index), so with torch.compile they
    fuse into the same graph as the loss.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, autocast: bool):
        super().__init__()
        self.stage, self.seed, self.mode = cfg.stage, cfg.run.seed, cfg.diti.mode
        self.fused_loss, self.t_buckets = cfg.fast.fused_loss, cfg.log.t_buckets
        self.device_type, self.autocast = device.type, autocast
        self.autocast_cache = True  # off under CUDA-graph capture (engine/graph_step.py)
        self.sched = make_schedule(cfg.model.diffusion, device)
        # Built with NCHW weights; channels_last_weights() re-lays them out after DeepSpeed's
        # start-up, whose parameter broadcast views every weight as bytes (a unit last stride).
        fast = dataclasses.replace(cfg.fast, channels_last=False)
        if cfg.stage == "ddpm":
            self.unet = build_unet(cfg.model, fast)
        else:
            m = cfg.model
            self.masks = TimestepMasks.build(m.masks, m.unet.latent_dim, m.diffusion.timesteps, device)
            self.encoder = build_encoder(m, fast)
            self.decoder = build_decoder(m, fast)
        self.channels_last = channels_last_on(cfg.fast, device.type)
        set_channels_last(self, self.channels_last, weights=False)

    def channels_last_weights(self) -> None:
        """Conv weights into channels_last (in place: the optimiser keeps its parameters). Not
        under ZeRO-1/2, whose flat buffers own the weights: there only activations are."""
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, x0: torch.Tensor, index: torch.Tensor):
        t, eps = noise.draw(self.seed, index, tuple(x0.shape[1:]), self.sched.timesteps)
        if self.channels_last:
            # ε and x0 in the models' layout, so x_t, ε̂, G and the loss are all channels_last. ε is
            # drawn in logical (NCHW) order, keyed by element index, whatever the layout: one
            # explicit copy of an image-sized tensor, as is x0's (a no-op when already channels_last).
            x0, eps = to_layout(x0, True), to_layout(eps, True)
        ctx = (torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=self.autocast_cache)
               if self.autocast else contextlib.nullcontext())
        with ctx:
            if self.stage == "ddpm":
                out = ddpm_objective(self.unet, x0, t, eps, self.sched, self.fused_loss, self.t_buckets)
            else:
                out = diti_objective(self.encoder, self.decoder, x0, t, eps, self.sched, self.masks,
                                     self.mode, self.fused_loss, num_buckets=self.t_buckets)
        return out, t


def _init_ddpm_path(cfg: TrainConfig) -> Path:
    path = Path(cfg.init.ddpm)
    if path.is_dir():
        path = export_path(path)
    if not path.is_file():
        raise ConfigError(f"init.ddpm={cfg.init.ddpm}: no such file (expected a ddpm-stage run's "
                          "export/ema.safetensors, its run directory, or an original checkpoint .pt)")
    return path


def check_init_ddpm(cfg: TrainConfig) -> Path:
    """Before any work: the frozen DDPM exists and (for our exports) was trained with this UNet."""
    path = _init_ddpm_path(cfg)
    if path.suffix != ".safetensors":
        # The original's checkpoint holds no config; its keys/shapes are checked on load, and the
        # config.yml beside it (when present) for what shapes cannot show (heads, attention order).
        if (path.parent / "config.yml").is_file():
            check_ddpm_config(cfg.model, path.parent / "config.yml")
        return path
    try:
        _, meta = load_weights(path, tensors=False)
    except CheckpointError as e:
        raise ConfigError(f"init.ddpm={e}") from None
    if not isinstance(meta, dict) or meta.get("stage") != "ddpm" or "model" not in meta:
        raise ConfigError(f"init.ddpm={path}: not a ddpm-stage export of this engine (metadata stage="
                          f"{(meta or {}).get('stage') if isinstance(meta, dict) else None!r})")
    ours, theirs = to_dict(cfg.model.unet), dict(meta["model"].get("unet", {}))
    # latent_dim only sizes the (trainable) label embedding; dropout never acts on the frozen path.
    diffs = [f"model.unet.{k}: export has {theirs.get(k)!r}, config has {v!r}" for k, v in ours.items()
             if k not in ("latent_dim", "dropout") and comparable(theirs.get(k)) != comparable(v)]
    if to_dict(cfg.model.diffusion) != meta["model"].get("diffusion"):
        diffs.append(f"model.diffusion: export has {meta['model'].get('diffusion')}, config has "
                     f"{to_dict(cfg.model.diffusion)}")
    if diffs:
        raise ConfigError(f"init.ddpm={path} was trained with a different DDPM: " + "; ".join(diffs))
    return path


def load_frozen_ddpm(decoder: nn.Module, cfg: TrainConfig) -> str:
    """Fill the frozen DDPM inside the ShiftUNet from init.ddpm (our export or the original's file)."""
    path = check_init_ddpm(cfg)
    if path.suffix == ".safetensors":
        tensors, _ = load_weights(path)
        load_state(decoder, split_prefixed(tensors, "unet"), f"init.ddpm={path}", allow_missing=TRAINABLE)
    else:
        load_original_ddpm(decoder, path, use_ema=cfg.init.ddpm_use_ema)
    decoder.freeze()
    return str(path)



def load_start_ddpm(unet: nn.Module, cfg: TrainConfig) -> str:
    """Stage ddpm with init.finetune: the UNet starts from init.ddpm (our export or the original's
    checkpoint) and stays trainable."""
    path = check_init_ddpm(cfg)
    if path.suffix == ".safetensors":
        tensors, _ = load_weights(path)
        load_state(unet, split_prefixed(tensors, "unet"), f"init.ddpm={path}")
    else:
        load_original_ddpm(unet, path, use_ema=cfg.init.ddpm_use_ema)
    return str(path)
