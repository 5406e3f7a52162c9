"""Per-chunk attribution: which groups of z's chunks let a linear probe decode which attribute.

Groups are DiTi's stages. With unequal masks (``stages`` + ``dims_per_stage``) a group is the dims one
stage unlocks, [sum(dims[:s]), sum(dims[:s+1])); with balanced masks the k chunks are cut into a few
equal groups (by stage when ``stages`` is set). Every attribute is probed from each group alone and from
the cumulative prefix z[:hi] up to that group (what a time-step in that group actually sees).

DiTi's claim, in these terms: fine attributes (lost after little noise) are decodable from the early
groups' prefix already; coarse attributes need the later groups.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..config import ModelConfig
from ..masks import chunk_index_table, end_dims
from .features import Splits
from .probe import AttributeSpec, ProbeConfig, train_probe


@dataclass
class ChunkGroup:
    name: str
    chunk_lo: int  # chunks [chunk_lo, chunk_hi)
    chunk_hi: int
    dim_lo: int    # dims [dim_lo, dim_hi) of z
    dim_hi: int
    t_lo: int      # time-steps [t_lo, t_hi) whose chunk is in the group
    t_hi: int

    @property
    def label(self) -> str:
        return f"{self.name}: z[{self.dim_lo}:{self.dim_hi}] t∈[{self.t_lo},{self.t_hi})"


def chunk_groups(cfg: ModelConfig, n_groups: int = 8) -> list[ChunkGroup]:
    """Consecutive chunk groups with their dim and time-step ranges (empty stages are skipped)."""
    T, k, D = cfg.diffusion.timesteps, cfg.masks.k, cfg.unet.latent_dim
    idx = chunk_index_table(T, k).tolist()
    ends = end_dims(cfg.masks, D, T).tolist()
    first_t = {}
    for t, i in enumerate(idx):
        first_t.setdefault(i, t)
    if cfg.masks.stages is not None:
        # Same rule as the masks: a chunk belongs to the first stage boundary beyond its start step.
        key = [next(s for s, b in enumerate(cfg.masks.stages) if b > first_t[i]) for i in range(k)]
    else:
        n = max(1, min(n_groups, k))
        key = [i * n // k for i in range(k)]
    groups, lo = [], 0
    for i in range(1, k + 1):
        if i == k or key[i] != key[lo]:
            dim_lo = ends[lo - 1] if lo else 0
            if ends[i - 1] > dim_lo:  # a stage given 0 dims unlocks nothing to probe
                t_hi = first_t[i] if i < k else T
                name = f"stage {key[lo] + 1}" if cfg.masks.stages is not None else f"group {key[lo] + 1}"
                groups.append(ChunkGroup(name, lo, i, dim_lo, ends[i - 1], first_t[lo], t_hi))
            lo = i
    return groups


@dataclass
class ChunkTable:
    groups: list[ChunkGroup]
    specs: list[AttributeSpec]
    alone: list[list[dict]]   # [group][attribute] test metrics, probe on the group's dims only
    prefix: list[list[dict]]  # [group][attribute] test metrics, probe on z[:dim_hi]
    probe: dict
    split: str
    # Control: as many dims as the group has, drawn at random from all of z. Groups differ in size (10 vs
    # 327 dims in the paper's config), so "alone" beating this control is what says the group itself,
    # not its width, holds the attribute.
    random: list[list[dict]] | None = None

    def matrix(self, mode: str, key: str = "skill") -> np.ndarray:
        """[attribute, group] array of one metric key."""
        rows = getattr(self, mode)
        return np.array([[rows[g][a][key] for g in range(len(self.groups))] for a in range(len(self.specs))],
                        dtype=np.float64)

    def onsets(self, frac: float = 0.9, min_skill: float = 0.1) -> list[dict]:
        """Per attribute: the first group whose prefix reaches ``frac`` of the best prefix skill (the
        attribute's onset), and the group that decodes it best on its own. None when never decodable."""
        pre, alone = self.matrix("prefix"), self.matrix("alone")
        rand = self.matrix("random") if self.random is not None else None
        out = []
        for a, s in enumerate(self.specs):
            best = np.nanmax(pre[a]) if np.isfinite(pre[a]).any() else math.nan
            onset = None
            if not math.isnan(best) and best >= min_skill:
                onset = int(next(g for g in range(len(self.groups)) if pre[a, g] >= frac * best))
            peak = int(np.nanargmax(alone[a])) if np.isfinite(alone[a]).any() else None
            out.append({"name": s.name, "group": s.group, "best_prefix_skill": best, "onset_group": onset,
                        "onset_dim": self.groups[onset].dim_hi if onset is not None else None,
                        "best_alone_group": peak,
                        "first_group_alone_skill": float(alone[a, 0]), "last_group_alone_skill": float(alone[a, -1]),
                        "first_group_random_skill": float(rand[a, 0]) if rand is not None else None})
        return out

    def to_json(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "attributes": [asdict(s) for s in self.specs],
                "alone": self.alone, "prefix": self.prefix, "random": self.random, "probe": self.probe,
                "split": self.split, "onsets": self.onsets()}


def chunk_attribution(splits: Splits, specs: list[AttributeSpec], groups: list[ChunkGroup],
                      cfg: ProbeConfig, log=print, control: bool = True) -> ChunkTable:
    data = [(s.z, s.attrs) for s in (splits.train, splits.val, splits.test)]
    D = splits.train.z.shape[1]
    rng = np.random.default_rng(cfg.seed)
    alone, prefix, random = [], [], []
    for g in groups:
        ra = train_probe(*data, specs, cfg, dims=slice(g.dim_lo, g.dim_hi))
        rp = train_probe(*data, specs, cfg, dims=slice(0, g.dim_hi))
        alone.append(ra.test)
        prefix.append(rp.test)
        msg = f"  {g.label}: mean skill alone {ra.summary['mean_skill']:.3f}, prefix {rp.summary['mean_skill']:.3f}"
        if control:
            rr = train_probe(*data, specs, cfg, dims=np.sort(rng.choice(D, g.dim_hi - g.dim_lo, replace=False)))
            random.append(rr.test)
            msg += f", {g.dim_hi - g.dim_lo} random dims {rr.summary['mean_skill']:.3f}"
        log(msg)
    return ChunkTable(groups, specs, alone, prefix, asdict(cfg), splits.description, random if control else None)


def format_chunk_table(table: ChunkTable, mode: str) -> str:
    """Markdown: one row per attribute, one column per group, raw metric (skill in parentheses)."""
    def col(g: ChunkGroup) -> str:
        return {"alone": f"{g.name} z[{g.dim_lo}:{g.dim_hi}]", "prefix": f"{g.name} z[:{g.dim_hi}]",
                "random": f"{g.name}: {g.dim_hi - g.dim_lo} random dims"}[mode]

    head = "| attribute | metric | " + " | ".join(col(g) for g in table.groups) + " |"
    lines = [head, "|---|---|" + "---|" * len(table.groups)]
    score, skill = table.matrix(mode, "score"), table.matrix(mode, "skill")
    for a, s in enumerate(table.specs):
        cells = " | ".join(f"{score[a, g]:.3f} ({skill[a, g]:.2f})" for g in range(len(table.groups)))
        tag = f" [{s.group}]" if s.group else ""
        lines.append(f"| {s.name}{tag} | {s.metric} | {cells} |")
    return "\n".join(lines)


def plot_heatmap(table: ChunkTable, path, title: str = "") -> None:
    """Two panels (group alone | cumulative prefix), attribute x group, colour = skill, text = raw metric."""
    # lazy: matplotlib is slow to import, and its backend must be chosen before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    na, ng = len(table.specs), len(table.groups)
    panels = [("alone", "group alone"), ("prefix", "cumulative prefix z[:hi]")]
    if table.random is not None:
        panels.append(("random", "control: as many random dims"))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.95 * ng * len(panels), 1.2 + 0.45 * na),
                             squeeze=False)
    labels = [f"{s.name} [{s.group}]" if s.group else s.name for s in table.specs]
    ticks = {"alone": lambda g: f"[{g.dim_lo}:{g.dim_hi})", "prefix": lambda g: f"[:{g.dim_hi})",
             "random": lambda g: f"{g.dim_hi - g.dim_lo} dims"}
    for ax, (mode, name) in zip(axes[0], panels):
        skill, score = table.matrix(mode, "skill"), table.matrix(mode, "score")
        im = ax.imshow(np.nan_to_num(skill, nan=0.0), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for a in range(na):
            for g in range(ng):
                v = score[a, g]
                ax.text(g, a, "–" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if np.nan_to_num(skill[a, g]) < 0.6 else "black")
        ax.set_xticks(range(ng))
        ax.set_xticklabels([f"{g.name}\n{ticks[mode](g)}\nt<{g.t_hi}" for g in table.groups], fontsize=7)
        ax.set_yticks(range(na))
        ax.set_yticklabels(labels if mode == "alone" else [], fontsize=8)  # shared rows: label once
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="skill (0 = chance, 1 = perfect)")
    fig.suptitle(title or "per-chunk attribution (text: AP / accuracy / Pearson r)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
