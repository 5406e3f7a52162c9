"""Chunk groups (DiTi stages) and per-chunk attribution on features with planted attributes."""
import numpy as np
import pytest

from diti_fast.config import MaskConfig, ModelConfig
from diti_fast.eval.chunks import chunk_attribution, chunk_groups, format_chunk_table, plot_heatmap
from diti_fast.eval.features import FeatureSet, make_splits
from diti_fast.eval.probe import ProbeConfig, specs_from_manifest
from diti_fast.masks import TimestepMasks


def _cfg(**masks) -> ModelConfig:
    return ModelConfig(masks=MaskConfig(**masks))


def test_stage_groups_match_the_documented_stages():
    cfg = _cfg(k=64, stages=(50, 100, 300, 500, 1000), dims_per_stage=(10, 25, 327, 100, 50))
    groups = chunk_groups(cfg)
    # docs/method.md §3: chunks per stage 4, 3, 13, 12, 32; effective boundaries t = 63, 110, 313, 500.
    assert [g.chunk_hi - g.chunk_lo for g in groups] == [4, 3, 13, 12, 32]
    assert [(g.dim_lo, g.dim_hi) for g in groups] == [(0, 10), (10, 35), (35, 362), (362, 462), (462, 512)]
    assert [g.t_hi for g in groups] == [63, 110, 313, 500, 1000]
    assert groups[0].t_lo == 0 and all(a.t_hi == b.t_lo for a, b in zip(groups, groups[1:]))
    # Every dim of a group is unlocked by one of the group's chunks (independent: the k_masks table).
    km = TimestepMasks.build(cfg.masks, 512, 1000).tables()["k_masks"]
    for g in groups:
        dims = km[g.chunk_lo:g.chunk_hi].sum(0).nonzero().flatten()
        assert (dims.min().item(), dims.max().item() + 1) == (g.dim_lo, g.dim_hi)


def test_balanced_groups_are_equal():
    groups = chunk_groups(_cfg(k=64), n_groups=8)
    assert len(groups) == 8
    assert all(g.dim_hi - g.dim_lo == 64 and g.chunk_hi - g.chunk_lo == 8 for g in groups)
    assert groups[-1].dim_hi == 512 and groups[-1].t_hi == 1000


def test_zero_dim_stage_is_skipped():
    groups = chunk_groups(_cfg(k=64, stages=(100, 500, 1000), dims_per_stage=(0, 256, 256)))
    assert [(g.dim_lo, g.dim_hi) for g in groups] == [(0, 256), (256, 512)]


@pytest.fixture(scope="module")
def table():
    """'fine' is planted in dims [0, 10) (stage 1), 'coarse' in [462, 512) (stage 5); the rest is noise."""
    rng = np.random.default_rng(1)
    n = 2000
    z = rng.standard_normal((n, 512)).astype(np.float32)
    fine = (z[:, :10].sum(1) > 0).astype(np.float32)
    coarse = np.argmax(z[:, 462:465], axis=1).astype(np.float32)
    attrs = np.stack([fine, coarse], 1)
    meta = [{"name": "fine_attr", "kind": "binary", "group": "fine"},
            {"name": "coarse_attr", "kind": "categorical", "num_classes": 3, "group": "coarse"}]
    fs = FeatureSet(z, attrs, np.arange(n), meta, "planted")
    cfg = _cfg(k=64, stages=(50, 100, 300, 500, 1000), dims_per_stage=(10, 25, 327, 100, 50))
    return chunk_attribution(make_splits(fs), specs_from_manifest(meta), chunk_groups(cfg),
                             ProbeConfig(epochs=8, lr=1e-2, standardize=True), log=lambda m: None)


def test_attribution_finds_the_planted_groups(table):
    alone = table.matrix("alone")
    assert alone.shape == (2, 5) and table.matrix("random").shape == (2, 5)
    assert int(np.argmax(alone[0])) == 0 and alone[0, 0] > 0.8   # fine: stage 1 alone
    assert int(np.argmax(alone[1])) == 4 and alone[1, 4] > 0.8   # coarse: stage 5 alone
    assert alone[0, 1:].max() < 0.3 and alone[1, :4].max() < 0.3
    on = {o["name"]: o for o in table.onsets()}
    assert on["fine_attr"]["onset_group"] == 0 and on["coarse_attr"]["onset_group"] == 4
    prefix = table.matrix("prefix")
    # Coarse appears only once its stage is in the prefix (weaker there: 512 dims for 1600 samples overfit).
    assert prefix[1, 3] < 0.2 and prefix[1, 4] > prefix[1, 3] + 0.3


def test_table_and_heatmap_outputs(table, tmp_path):
    md = format_chunk_table(table, "prefix")
    assert md.count("\n") == 1 + 2 and "fine_attr [fine]" in md
    plot_heatmap(table, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_random_dims_control_does_not_find_the_planted_attribute(table):
    # 10 random dims out of 512 almost never include enough of the planted [0, 10) to decode 'fine_attr'.
    rand = table.matrix("random")
    assert rand[0, 0] < table.matrix("alone")[0, 0] - 0.5
    assert table.onsets()[0]["first_group_random_skill"] == rand[0, 0]
