"""Resuming on another number of ranks or ZeRO stage: the Adam state by parameter name.

Under ZeRO 1/2 each rank's optimiser holds one flat fp32 partition per parameter group, and its
Adam moments are slices of that flat vector; stage 0 holds per-parameter moments on every rank.
Neither survives a change of world size or stage. At every checkpoint (``checkpoint.elastic``) the
moments are therefore also gathered into one tensor per parameter name — the layout-free form
DeepSpeed's universal checkpoint uses, written by the engine itself since the models here fit in
one process's memory — and a launch with another layout scatters them back into whatever its
optimiser looks like. DeepSpeed's own fragment map (``param._hp_mapping``: where a parameter's
slice lies in the parameter and in this rank's partition) is the only internal used.

The master weights are the module's fp32 parameters (the engine trains fp32 with bf16 autocast),
so they come from ``model.pt``; ZeRO's partition copies are refreshed from them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FILE = "optimizer-full.pt"
KEYS = ("exp_avg", "exp_avg_sq")
TESTED = ">=0.19.8,<0.20"  # the DeepSpeed range pyproject.toml allows: the one these internals were checked on


class DeepSpeedInternalsError(RuntimeError):
    """The installed DeepSpeed lacks (or has reshaped) a private attribute the engine relies on."""


def internals_error(name: str, detail: str) -> DeepSpeedInternalsError:
    import deepspeed  # lazy: only to name its version in an error; importing it takes ~0.5 s
    return DeepSpeedInternalsError(
        f"deepspeed {deepspeed.__version__}: private attribute {name} {detail}; diti-fast reads it to save and "
        f"resume the optimiser state and was tested with deepspeed{TESTED} (install a version in that range)")


def check_internals(engine) -> None:
    """Every private piece of DeepSpeed's ZeRO 1/2 optimiser used below, checked once after
    ``deepspeed.initialize``: a DeepSpeed that changed them fails here, by name, not at resume."""
    if not _zero(engine):
        return
    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise internals_error("optimizer.bit16_groups", f"is {type(groups).__name__}, not a list of parameter lists")
    for name in ("single_partition_of_fp32_groups", "real_dp_process_group"):
        value = getattr(opt, name, None)
        if not isinstance(value, list) or len(value) != len(groups):
            raise internals_error(f"optimizer.{name}", f"is {type(value).__name__}, not a list of {len(groups)} "
                                  "(one per parameter group)")
    if not all(isinstance(t, torch.Tensor) for t in opt.single_partition_of_fp32_groups):
        raise internals_error("optimizer.single_partition_of_fp32_groups", "does not hold tensors")
    if not callable(getattr(opt, "_restore_from_bit16_weights", None)):
        raise internals_error("optimizer._restore_from_bit16_weights()", "is missing")
    if not isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        raise internals_error("optimizer.optimizer", "is not the wrapped torch optimiser")
    for params in groups:
        for p in params:
            if not hasattr(p, "_hp_mapping"):
                raise internals_error("param._hp_mapping", "is missing")
            m = p._hp_mapping
            if m is None:
                continue  # no slice of this parameter on this rank
            for name in ("lp_fragment_address.start", "lp_fragment_address.numel", "hp_fragment_address.start"):
                obj = m
                for part in name.split("."):
                    obj = getattr(obj, part, None)
                if not isinstance(obj, int):
                    raise internals_error(f"param._hp_mapping.{name}", f"is {type(obj).__name__}, not an int")


def _zero(engine) -> bool:
    return not isinstance(engine.optimizer, torch.optim.Optimizer)


def _fragments(params):
    """(param, offset in the group, (lp start, hp start, numel) or None) for one ZeRO group."""
    offset = 0
    for p in params:
        m = getattr(p, "_hp_mapping", None)
        frag = None if m is None else (m.lp_fragment_address.start, m.hp_fragment_address.start,
                                       m.lp_fragment_address.numel)
        yield p, offset, frag
        offset += p.numel()


def full_optimizer_state(engine, names: dict[int, str], rank: int) -> dict | None:
    """Collective under ZeRO: ``{"state": {name: {exp_avg, exp_avg_sq, step}}}``, fp32 on the CPU,
    on rank 0 (the writer); None elsewhere."""
    out = {}
    if not _zero(engine):
        if rank != 0:
            return None
        opt = engine.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if st:
                    out[names[id(p)]] = {**{k: st[k].detach().float().cpu() for k in KEYS},
                                         "step": float(st["step"])}
        return {"state": out}
    opt = engine.optimizer
    for i, params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        st = opt.optimizer.state.get(flat, {})
        total = sum(p.numel() for p in params)
        buf = torch.zeros(len(KEYS), total, dtype=torch.float32, device=flat.device)
        for p, off, frag in _fragments(params):
            if frag is not None and st:
                lp, hp, n = frag
                for k, key in enumerate(KEYS):
                    buf[k, off + lp:off + lp + n] = st[key][hp:hp + n]
        # Every element lives on exactly one rank (zeros elsewhere): a sum gathers them.
        group = opt.real_dp_process_group[i]
        dist.reduce(buf, dst=dist.get_global_rank(group, 0), group=group)
        step = float(st["step"]) if st else 0.0
        if rank != 0 or step == 0:
            continue  # not the writer, or no optimiser step taken yet (Adam has no state)
        buf = buf.cpu()
        for p, off, _ in _fragments(params):
            out[names[id(p)]] = {**{key: buf[k, off:off + p.numel()].view_as(p).clone() for k, key in enumerate(KEYS)},
                                 "step": float(step)}
    return {"state": out} if rank == 0 else None


def load_full_optimizer_state(engine, full: dict, names: dict[int, str], where: str) -> None:
    """Scatter a gathered Adam state into this launch's optimiser (after the module's weights are
    loaded). Raises ValueError naming the parameters when the state does not fit the model."""
    state, opt = full["state"], engine.optimizer
    params = ([p for ps in opt.bit16_groups for p in ps] if _zero(engine)
              else [p for g in opt.param_groups for p in g["params"]])
    trainable = {names[id(p)]: p for p in params}
    missing, extra = sorted(set(trainable) - set(state)), sorted(set(state) - set(trainable))
    bad = [n for n in set(trainable) & set(state) if state[n]["exp_avg"].shape != trainable[n].shape]
    if (missing and state) or extra or bad:
        raise ValueError(f"{where}: optimiser state does not fit the model (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, mis-shaped {bad[:5]})")
    if not state:
        return
    if not _zero(engine):
        packed, i = {}, 0
        for group in opt.param_groups:
            for p in group["params"]:
                s = state[names[id(p)]]
                packed[i] = {"step": torch.tensor(s["step"]), **{k: s[k] for k in KEYS}}
                i += 1
        opt.load_state_dict({"state": packed, "param_groups": opt.state_dict()["param_groups"]})
        return
    opt._restore_from_bit16_weights()  # the fp32 partitions from the weights model.pt just loaded
    packed = {}
    for i, params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        moments = [torch.zeros_like(flat) for _ in KEYS]
        step = 0.0
        for p, _, frag in _fragments(params):
            s = state[names[id(p)]]
            step = max(step, s["step"])
            if frag is not None:
                lp, hp, n = frag
                for m, key in zip(moments, KEYS):
                    m[hp:hp + n] = s[key].reshape(-1)[lp:lp + n].to(m.device)
        packed[i] = {"step": torch.tensor(step), **dict(zip(KEYS, moments))}
    base = opt.optimizer
    base.load_state_dict({"state": packed, "param_groups": base.state_dict()["param_groups"]})


def map_position(meta: dict, world: int, micro: int) -> dict:
    """The data position for a new layout. All ranks consume micro-batches in lockstep, so the
    saved (epoch, batch) of rank 0 says how many samples of that epoch the job consumed; the new
    ranks skip the same number. The step (hence every global sample index, which keys t and ε)
    continues exactly; with shards, the order within the rest of that epoch is the new layout's
    (the stream is a function of the world size), so some of its images may repeat or be left out
    until the epoch ends."""
    pos = meta.get("data") or {"epoch": 0, "batch": 0}
    consumed = int(pos["batch"]) * int(meta.get("micro_batch", micro)) * int(meta["world_size"])
    return {"epoch": int(pos["epoch"]), "batch": consumed // (micro * world)}
