"""Training-time visuals: every ``log.visuals_every`` steps, a grid from the EMA weights into
``RUN/visuals/step-XXXXXXXX.png`` and TensorBoard.

* stage ddpm: DDIM samples of the EMA UNet from a fixed noise (the same noise every time, so the grids
  show training progress, not sampling luck);
* stage diti: for a fixed set of training images (the first ones the run sees), the input, its
  reconstruction (masked-DDIM inversion and decoding with the EMA encoder/decoder) and z decoded from
  the fixed noise (what z alone fixes). PDAE runs sample without masks, as they were trained.

Rank 0 only; the live models are untouched (the EMA weights go into a copy).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from diti_fast.grids import image_grid, save_grid
from diti_fast.sampling import ddim_sample, masked_ddim


class Visuals:
    def __init__(self, cfg, run_dir: Path, enabled: bool, tensorboard=None):
        self.cfg, self.every, self.tb = cfg, cfg.log.visuals_every, tensorboard
        self.enabled = enabled and self.every > 0
        self.dir = Path(run_dir) / "visuals"
        self.x0: torch.Tensor | None = None

    def maybe(self, step: int, objective, ema, x0: torch.Tensor) -> Path | None:
        """Call once per step with the step's model-space batch; renders on multiples of ``every``."""
        if not self.enabled:
            return None
        if self.x0 is None:  # the first batch seen: fixed from then on
            self.x0 = x0[: self.cfg.log.visuals_num].detach().float().clone()
        if step % self.every:
            return None
        return self.render(step, objective, ema)

    def _ema_copy(self, objective, ema, name: str):
        module = getattr(objective, name)
        clone = copy.deepcopy(module)
        clone.load_state_dict(ema.full_state_dict(module, f"{name}."))
        return clone.eval()

    @torch.no_grad()
    def render(self, step: int, objective, ema) -> Path:
        cfg, steps = self.cfg, self.cfg.log.visuals_steps
        x0 = self.x0
        g = torch.Generator(device="cpu").manual_seed(cfg.run.seed)
        noise = torch.randn((cfg.log.visuals_num, *x0.shape[1:]), generator=g).to(x0.device)
        if cfg.stage == "ddpm":
            unet = self._ema_copy(objective, ema, "unet")
            x = ddim_sample(unet, noise, objective.sched, steps)
            ncol = int(math.ceil(math.sqrt(len(x))))
            pad = ncol * ncol - len(x)
            x = torch.cat([x, torch.ones(pad, *x.shape[1:], device=x.device)]) if pad else x
            grid, labels, cols = x.reshape(ncol, ncol, *x.shape[1:]), None, None
            title = f"step {step}: EMA DDPM, {steps} DDIM steps, fixed noise"
        else:
            enc = self._ema_copy(objective, ema, "encoder")
            dec = self._ema_copy(objective, ema, "decoder")
            masks = None if cfg.diti.mode == "pdae" else objective.masks
            z = enc(x0)
            x_T = masked_ddim(dec, x0, z, objective.sched, masks, steps=steps, inverse=True)
            both = masked_ddim(dec, torch.cat([x_T, noise[: len(x0)]]), torch.cat([z, z]), objective.sched, masks,
                               steps=steps)
            grid = torch.stack([x0.clamp(-1, 1), both[: len(x0)], both[len(x0):]])
            labels, cols = ["input", "reconstruction", "z, fixed noise"], None
            title = f"step {step}: EMA encoder/decoder, {steps} inversion / {steps} DDIM steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        path = save_grid(self.dir / f"step-{step:08d}.png", grid, labels, cols, title=title)
        if self.tb is not None:
            self.tb.add_image("visuals", np.asarray(image_grid(grid, labels, cols, title=title)), step,
                              dataformats="HWC")
        return path
