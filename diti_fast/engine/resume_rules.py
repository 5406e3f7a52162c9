"""Which config changes a resumed run accepts: the saved ``RUN/config.yaml`` against the new one.

How long a run trains, how it logs, saves and compiles may change between launches; anything that
changes what is trained (model, data, objective, optimiser, seed) is a conflict, named key by key.
"""
from __future__ import annotations

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


def _saved_lr_rule(flat: dict) -> str:
    """The lr rule a flattened saved config trained with. Configs saved by earlier versions of this
    engine may hold lr_rule 'auto' (per_gpu, none for pdae) or only scale_lr_by_batch; they are
    compared on resume by the rule they meant, not by the raw keys."""
    rule = flat.pop("optim.lr_rule", "auto")
    scaled = flat.pop("optim.scale_lr_by_batch", True)
    if rule != "auto":
        return rule
    if scaled is False:
        return "none"
    return "none" if flat.get("stage") == "diti" and flat.get("diti.mode") == "pdae" else "per_gpu"


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between the saved and the new resolved config."""
    a, b = flatten(saved), flatten(current)
    for f in (a, b):
        f["optim.lr_rule"] = _saved_lr_rule(f)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(RESUME_MUTABLE) or k in RESUME_MUTABLE:
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs
