"""Count what a training step asks of the device: aten ops (eager) and layout copies.

Each top-level aten op an eager step dispatches is at least one kernel launch on a GPU, so their
count is the step's launch budget before torch.compile or a CUDA graph. ``OpCensus`` is a
``TorchDispatchMode``: it sees every op after autograd (forward, backward and optimiser alike, on
any device), including the ones PyTorch inserts itself, such as the ``clone`` behind a
``reshape`` that cannot be a view or the copy ``AccumulateGrad`` makes when a gradient's layout
differs from its parameter's. Those hidden layout conversions are what ``layout_copies`` lists:
every clone / copy / dtype-or-layout conversion whose output is laid out differently from its
input (same shape, different stride order).

Used by ``benchmarks/bench_launch_budget.py`` and ``tests/test_channels_last.py``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that move a tensor's elements into a new buffer; a layout copy when the order changes.
_COPY_OPS = {aten.clone.default, aten._to_copy.default, aten.copy_.default, aten.contiguous.default}
# Pure metadata: no kernel, never a launch.
_VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
             aten.transpose.int, aten.t.default, aten.expand.default, aten.squeeze.dim, aten.squeeze.dims,
             aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.unbind.int, aten.split.Tensor,
             aten.split_with_sizes.default, aten.chunk.default, aten.alias.default, aten.detach.default,
             aten.as_strided.default, aten._reshape_alias.default, aten.flatten.using_ints, aten.unflatten.int,
             aten.lift_fresh.default, aten.diagonal.default}


def _order(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions sorted from the largest stride to the smallest (size-1 dims left out)."""
    dims = [d for d in range(t.ndim) if t.shape[d] != 1]
    return tuple(sorted(dims, key=lambda d: -t.stride(d)))


@dataclass
class LayoutCopy:
    op: str
    shape: tuple[int, ...]
    src_stride: tuple[int, ...]
    dst_stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class OpCensus(TorchDispatchMode):
    """``with OpCensus() as c: step()`` then ``c.ops`` (Counter of kernel-launching aten ops),
    ``c.total`` and ``c.layout_copies``."""
    ops: Counter = field(default_factory=Counter)
    views: int = 0
    layout_copies: list[LayoutCopy] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _VIEW_OPS:
            self.views += 1
            return out
        self.ops[str(func.overloadpacket.__name__)] += 1
        if func in _COPY_OPS:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.ndim >= 2
                    and src.shape == dst.shape and _order(src) != _order(dst)):
                self.layout_copies.append(LayoutCopy(str(func), tuple(src.shape), tuple(src.stride()),
                                                     tuple(dst.stride())))
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())
