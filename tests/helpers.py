"""Small helpers shared by several test files (tests/ is on sys.path under pytest's default import mode)."""
from __future__ import annotations

import torch


def tree_diff(a, b, path: str = "") -> list[str]:
    """Paths where two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in tree_diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path + " (len)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel: records each ``kernel[grid](...)`` launch, then launches.

    Patched over a kernel module's global (``monkeypatch.setattr(mod, "_partial_kernel", ...)``), it
    proves the fused path really launched Triton (interpreted on CPU, compiled on CUDA) instead of
    falling back to the eager reference."""

    def __init__(self, kernel, name: str, log: list):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def spy_on_kernels(monkeypatch, kernels: dict) -> list[str]:
    """Replace {module: [kernel names]} by spies; returns the shared launch log."""
    log: list[str] = []
    for mod, names in kernels.items():
        for name in names:
            monkeypatch.setattr(mod, name, LaunchSpy(getattr(mod, name), name, log))
    return log
