"""What a training run holds once it is set up, and the writes it makes of it.

:class:`Run` bundles the objects a checkpoint or
an export is made from, so the loop reads ``run.save(step)`` and ``run.export()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diti_fast.engine.checkpoints import checkpoint_step, save_checkpoint
from diti_fast.engine.config_files import resolved_dict
from diti_fast.engine.distributed import Ranks
from diti_fast.engine.ema import EMA
from diti_fast.engine.metrics import Meter
from diti_fast.engine.microbatches import MicroBatches
from diti_fast.engine.objective import Objective
from diti_fast.engine.run_config import TrainConfig
from diti_fast.weights import export_path, save_export


@dataclass
class Run:
    cfg: TrainConfig
    dir: Path
    ranks: Ranks
    objective: Objective
    engine: object        # DeepSpeed's engine
    ema: EMA
    data: MicroBatches
    last_checkpoint: Path | None = None

    def save(self, step: int) -> Path:
        """The whole training state at ``step`` (collective); remembered as the last checkpoint."""
        self.last_checkpoint = save_checkpoint(self.cfg, self.dir, self.engine, self.ema, self.data, step,
                                               self.ranks)
        return self.last_checkpoint

    def saved_at(self, step: int) -> bool:
        return checkpoint_step(self.last_checkpoint) == step

    def export(self) -> Path:
        """EMA weights + resolved config as safetensors (what evaluation's load_export reads): the
        live modules' state dicts with their trainable entries swapped for the EMA, no model rebuilt.
        Rank 0 only."""
        cfg = self.cfg
        parts = ("unet",) if cfg.stage == "ddpm" else ("encoder", "decoder")
        states = {name: self.ema.full_state_dict(getattr(self.objective, name), f"{name}.") for name in parts}
        return save_export(export_path(self.dir), cfg.stage, cfg.model, resolved_dict(cfg), **states)

    def periodic(self, step: int, total: int, meter: Meter) -> None:
        """``checkpoint.every`` and ``checkpoint.export_every`` (the final ones are the loop's)."""
        c = self.cfg.checkpoint
        if c.every and step % c.every == 0 and step < total:
            if float(meter.consecutive) == 0:  # never checkpoint in the middle of a bad streak
                self.save(step)
            elif self.ranks.lead:
                print(f"[diti-fast] step {step}: checkpoint skipped (non-finite streak)", flush=True)
        if c.export_every and step % c.export_every == 0 and self.ranks.lead:
            self.export()
