"""diti-fast's Triton kernels, imported as ``diti_fast.kernels`` (never as a bare ``kernels``: that
name belongs to an unrelated PyPI package that other libraries import).

    from diti_fast.kernels import adaptive_group_norm, diti_loss, ddpm_loss

Each op is a ``torch.library`` custom op with a fake (meta) implementation and autograd, so it
works under torch.compile. One file per op holds its Triton kernels, its reference (``*_ref``) and
its launcher: ``fused_norm.py`` (the ShiftUNet's chunk-conditioned adaptive GroupNorm + SiLU) and
``fused_loss.py`` (DiTi's noise-weighted shift loss and the plain DDPM loss).

On a machine without a GPU the kernels run only under Triton's interpreter, which reads
``TRITON_INTERPRET=1`` when a kernel module is imported: set it before the first import.
The ops are loaded on first access, so ``import diti_fast.kernels`` alone imports no Triton code.
"""
import importlib

_OPS = {
    "adaptive_group_norm": ".fused_norm",
    "adaptive_group_norm_ref": ".fused_norm",
    "diti_loss": ".fused_loss",
    "diti_loss_ref": ".fused_loss",
    "ddpm_loss": ".fused_loss",
    "ddpm_loss_ref": ".fused_loss",
}
__all__ = sorted(_OPS)


def __getattr__(name):
    if name in _OPS:
        value = getattr(importlib.import_module(_OPS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_OPS))
