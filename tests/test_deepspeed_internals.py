"""Every private DeepSpeed attribute the engine reads (engine/elastic.py, engine/distributed.py),
exercised on the installed DeepSpeed: ZeRO stages 0, 1 and 2 on a small model, one Adam step,
the gathered per-parameter moments against plain Adam's closed form, and the round trip back. A
DeepSpeed that moved one of them fails ``check_internals`` with the attribute and the version."""
import copy

import pytest
import torch
import torch.nn as nn

from diti_fast.engine import elastic
from diti_fast.engine.distributed import setup_distributed, skip_shm_build
from test_train_resilience import tiny


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(7, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _engine(tmp_path, stage: int):
    import deepspeed
    setup_distributed(tiny(tmp_path))  # a one-process gloo group (or the one already there)
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 2 ** 62,
              "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    return engine


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_private_state_is_where_the_engine_reads_it(tmp_path, stage):
    engine = _engine(tmp_path, stage)
    reference = copy.deepcopy(_Net())
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    loss = engine(x).square().sum()
    engine.backward(loss)
    engine.step()
    reference(x).square().sum().backward()
    elastic.check_internals(engine)  # bit16_groups, fp32 partitions, dp groups, _hp_mapping, ...
    names = {id(p): n for n, p in engine.module.named_parameters()}
    full = elastic.full_optimizer_state(engine, names, rank=0)
    # One Adam step from zero moments: exp_avg = (1 - β1) g, exp_avg_sq = (1 - β2) g².
    for n, p in reference.named_parameters():
        got = full["state"][n]
        torch.testing.assert_close(got["exp_avg"], 0.1 * p.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got["exp_avg_sq"], 0.001 * p.grad.square(), rtol=1e-5, atol=1e-10)
        assert got["step"] == 1
    # Back in through _restore_from_bit16_weights and the fragment map: the same state comes out.
    doubled = {"state": {n: {**s, "exp_avg": 2 * s["exp_avg"]} for n, s in full["state"].items()}}
    elastic.load_full_optimizer_state(engine, doubled, names, "test")
    again = elastic.full_optimizer_state(engine, names, rank=0)
    for n, s in doubled["state"].items():
        torch.testing.assert_close(again["state"][n]["exp_avg"], s["exp_avg"])


ZERO_ATTRIBUTES = ["bit16_groups", "single_partition_of_fp32_groups", "real_dp_process_group",
                   "_restore_from_bit16_weights", "optimizer"]


@pytest.mark.parametrize("name", ZERO_ATTRIBUTES + ["_hp_mapping", "_hp_mapping.lp_fragment_address"])
def test_a_missing_attribute_is_named_with_the_version(tmp_path, monkeypatch, name):
    import deepspeed
    engine = _engine(tmp_path, 2)
    opt = engine.optimizer
    if name.startswith("_hp_mapping"):
        p = opt.bit16_groups[0][0]
        if name == "_hp_mapping":
            monkeypatch.delattr(p, "_hp_mapping")
        else:
            monkeypatch.setattr(p, "_hp_mapping", object())
    elif name in vars(opt):
        monkeypatch.delitem(vars(opt), name)
    else:
        monkeypatch.setattr(type(opt), name, None)
    with pytest.raises(elastic.DeepSpeedInternalsError,
                       match=rf"deepspeed {deepspeed.__version__}: private attribute \S*{name.split('.')[0]}"):
        elastic.check_internals(engine)


def test_the_op_table_is_checked(monkeypatch):
    import deepspeed
    table = deepspeed.ops.__compatible_ops__
    assert isinstance(table, dict) and "deepspeed_shm_comm" in table  # what setup_distributed sets
    monkeypatch.setitem(table, "deepspeed_shm_comm", True)
    skip_shm_build(deepspeed)
    assert table["deepspeed_shm_comm"] is False
    monkeypatch.delitem(table, "deepspeed_shm_comm")
    with pytest.raises(elastic.DeepSpeedInternalsError, match=rf"deepspeed {deepspeed.__version__}: private attribute "
                       r"deepspeed.ops.__compatible_ops__\['deepspeed_shm_comm'\] is missing"):
        skip_shm_build(deepspeed)


def test_the_engine_config_turns_deepspeeds_step_timer_off(tmp_path):
    """DeepSpeed's throughput timer synchronises the device twice per step unless the config turns
    it off; the engine's config must, as DeepSpeed itself reads it."""
    import deepspeed
    from diti_fast.engine.distributed import deepspeed_config
    cfg = tiny(tmp_path)
    setup_distributed(cfg)
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=deepspeed_config(cfg, 1))
    timer = engine.tput_timer.config
    assert (timer.enabled, timer.synchronized) == (False, False)
    assert engine.wall_clock_breakdown() is False
