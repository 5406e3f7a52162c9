"""The step's two per-step rules, each written once and shared by the eager and the captured step:
the EMA weight (engine/ema.py ``step_weight``) and the global sample index (engine/noise.py
``first_index``), checked against their closed forms."""
from __future__ import annotations

import pytest
import torch

from diti_fast.engine.ema import step_weight
from diti_fast.engine.noise import first_index


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("decay", [0.9, 0.9999, 0.0])
def test_the_device_ema_weight_is_bitwise_the_python_float_rule(every, warmup, decay):
    for done in range(40):
        s = done + 1
        for ok in (True, False):
            finite = torch.tensor(ok)
            got = step_weight(torch.tensor(done, dtype=torch.int64), finite, decay, every, warmup)
            if s % every:
                want = torch.zeros((), dtype=torch.float32)
            else:
                n = s // every - 1
                d = min(decay, (1 + n) / (10 + n)) if warmup else decay
                want = finite * (1.0 - d)  # bool tensor × Python float: float32
            assert got.dtype == torch.float32 and got.shape == ()
            assert torch.equal(got, want), (done, ok, got.item(), want.item())


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 3)])
def test_the_micro_batches_of_a_step_cover_its_slice_of_the_global_index_once(world, accum):
    batch = 24
    micro = batch // world // accum
    for step in (0, 1, 7):
        firsts = [first_index(step, batch, r, world, m, micro) for r in range(world) for m in range(accum)]
        got = sorted(i for f in firsts for i in range(f, f + micro))
        assert got == list(range(step * batch, (step + 1) * batch))
        # the device counter gives the same index as the host integer
        t = first_index(torch.tensor(step), batch, world - 1, world, accum - 1, micro)
        assert t.item() == firsts[-1] and t.dtype == torch.int64
