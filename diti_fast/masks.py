"""DiTi's time-step -> chunk -> latent-prefix map.

Time-step t belongs to chunk idx(t) = floor(t / (T / k)); chunk i unlocks the prefix z[:E_i].
The hot path only needs the per-sample prefix length E[idx(t)] (an int per sample) and builds the
mask as ``arange(D) < E`` on the fly — no [k, D] table gather. The [k, D] tables are kept for the
fixture checker and for readers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, MaskConfig


def chunk_index_table(timesteps: int, k: int) -> torch.Tensor:
    """t -> chunk, int64 [T]. Same float arithmetic as the original (Python doubles)."""
    step = float(timesteps) / k
    return torch.tensor([int(float(t) / step) for t in range(timesteps)], dtype=torch.long)


def end_dims(cfg: MaskConfig, latent_dim: int, timesteps: int) -> torch.Tensor:
    """E_i for every chunk, int64 [k].

    Balanced: E_i = int(D / k * (i + 1)). Unequal: a chunk belongs to the first stage boundary
    strictly greater than its start time-step; stage s spreads dims_per_stage[s] over its n_s chunks
    in equal integer parts and its last chunk absorbs the remainder.
    """
    cfg.check_against(latent_dim, timesteps)
    k = cfg.k
    if cfg.dims_per_stage is None:
        return torch.tensor([int(float(latent_dim) / k * (i + 1)) for i in range(k)], dtype=torch.long)
    idx = chunk_index_table(timesteps, k).tolist()
    start = {}
    for t, i in enumerate(idx):
        start.setdefault(i, t)
    stage_of = [next(s for s, b in enumerate(cfg.stages) if b > start[i]) for i in range(k)]
    counts = [stage_of.count(s) for s in range(len(cfg.stages))]
    empty = [cfg.stages[s] for s, n in enumerate(counts) if n == 0 and cfg.dims_per_stage[s] > 0]
    if empty:
        raise ConfigError(f"masks.stages: the stage(s) ending at {empty} contain no chunk start with k={k}, "
                          "so their dims_per_stage could never be unlocked")
    out, seen = [], [0] * len(cfg.stages)
    for i in range(k):
        s = stage_of[i]
        before = sum(cfg.dims_per_stage[:s])
        seen[s] += 1
        if seen[s] == counts[s]:
            out.append(before + cfg.dims_per_stage[s])
        else:
            out.append(before + (cfg.dims_per_stage[s] // counts[s]) * seen[s])
    return torch.tensor(out, dtype=torch.long)


def prefix_mask(ends: torch.Tensor, latent_dim: int, dtype=torch.float32) -> torch.Tensor:
    """[B] prefix lengths -> [B, D] mask with ones on [0, end)."""
    ar = torch.arange(latent_dim, device=ends.device)
    return (ar[None, :] < ends[:, None]).to(dtype)


def range_mask(lo: torch.Tensor, hi: torch.Tensor, latent_dim: int, dtype=torch.float32) -> torch.Tensor:
    ar = torch.arange(latent_dim, device=lo.device)
    return ((ar[None, :] >= lo[:, None]) & (ar[None, :] < hi[:, None])).to(dtype)


@dataclass
class TimestepMasks:
    """Everything DiTi derives from (T, k, stages, dims): tables on one device."""
    t_to_idx: torch.Tensor    # int64 [T]
    end_dims: torch.Tensor    # int64 [k]  E_i
    latent_dim: int

    @classmethod
    def build(cls, cfg: MaskConfig, latent_dim: int, timesteps: int, device="cpu") -> "TimestepMasks":
        return cls(chunk_index_table(timesteps, cfg.k).to(device),
                   end_dims(cfg, latent_dim, timesteps).to(device), latent_dim)

    @property
    def k(self) -> int:
        return self.end_dims.shape[0]

    def to(self, device) -> "TimestepMasks":
        return TimestepMasks(self.t_to_idx.to(device), self.end_dims.to(device), self.latent_dim)

    # per-sample prefix lengths (the hot path)
    def end_for_t(self, t: torch.Tensor) -> torch.Tensor:
        return self.end_dims[self.t_to_idx[t]]

    def prev_end_for_t(self, t: torch.Tensor) -> torch.Tensor:
        idx = self.t_to_idx[t]
        prev = torch.cat([self.end_dims.new_zeros(1), self.end_dims])
        return prev[idx]

    def cumulative(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """m_t: ones on [0, E_idx(t))."""
        return prefix_mask(self.end_for_t(t), self.latent_dim, dtype)

    def chunk(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Only the current chunk's dims [E_{idx-1}, E_idx)."""
        return range_mask(self.prev_end_for_t(t), self.end_for_t(t), self.latent_dim, dtype)

    def receding(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The dims unlocked by earlier chunks, [0, E_{idx-1})."""
        return prefix_mask(self.prev_end_for_t(t), self.latent_dim, dtype)

    # [k, D] tables, in the original's names (for the checker and for plots)
    def tables(self) -> dict[str, torch.Tensor]:
        ar = torch.arange(self.latent_dim, device=self.end_dims.device)
        hi = self.end_dims[:, None]
        lo = torch.cat([self.end_dims.new_zeros(1), self.end_dims[:-1]])[:, None]
        return {"masks": (ar < hi).float(), "k_masks": ((ar >= lo) & (ar < hi)).float(),
                "receding_masks": (ar < lo).float()}
