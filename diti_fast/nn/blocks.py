"""Guided-diffusion building blocks with DiTi's conditioned ResBlockShift.

Module and parameter names follow the original exactly (``in_layers.0`` is the GroupNorm,
``out_layers.3`` the zero-initialised conv, ...) so the original's checkpoints load as they are.
The forward passes route every GroupNorm through :func:`norm_act`, which is either the eager
composite (the reference path, op for op the original) or the fused Triton kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..config import GROUPS
from .attention import qkv_attention, qkv_attention_tokens


class FastOptions:
    """Per-module speed switches, set model-wide by :func:`diti_fast.nn.configure_fast`."""
    fused_norm: bool = False
    attention: str = "sdpa"
    channels_last: bool = False


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A model's input in the layout its weights were given: the one explicit layout conversion
    (a no-op when the caller already hands over channels_last, as the CUDA-graph step does)."""
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def norm_act(gn: nn.GroupNorm, x: torch.Tensor, scale=None, shift=None, z_scale=None, z_shift=None,
             act: bool = True, fused: bool = False) -> torch.Tensor:
    """act((1 + z_scale)·(GN(x)·(1 + scale) + shift) + z_shift), modulations [B, C]."""
    if fused:
        return kernels.adaptive_group_norm(x, gn.num_groups, gn.weight, gn.bias, scale=scale, shift=shift,
                                           z_scale=z_scale, z_shift=z_shift, eps=gn.eps,
                                           act="silu" if act else None)
    if (x.device.type == "cpu" and not x.requires_grad and gn.weight.requires_grad and torch.is_grad_enabled()
            and x.ndim == 4 and not x.is_contiguous()):
        # PyTorch's CPU GroupNorm backward crashes (segfault, torch 2.13) on a channels_last input
        # that needs no gradient while the affine weights do (the first norm of the shift branch,
        # fed by the frozen path). Asking for x's gradient takes the kernel's working path.
        x = x.detach().requires_grad_(True)
    h = gn(x)
    expand = (...,) + (None,) * (x.ndim - 2)
    if scale is not None:
        h = h * (1.0 + scale[expand]) + shift[expand]
    if z_scale is not None:
        h = (1.0 + z_scale[expand]) * h + z_shift[expand]
    return F.silu(h) if act else h


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (guided-diffusion's order)."""
    half = dim // 2
    # Built on t's device: a CPU tensor copied to the GPU every forward would be a host sync per step.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


class ResBlock(nn.Module, FastOptions):
    """GN-SiLU-conv, then GN modulated by the time embedding (scale first), SiLU, dropout, zero conv.

    ``z_conditioned`` turns it into the original's ResBlockShift: a second modulation from the
    latent embedding wraps the first, (1 + s_z)·(GN(h)(1 + s) + b) + b_z.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 up: bool = False, down: bool = False, z_conditioned: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        if z_conditioned:
            self.emb_z_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        else:
            self.emb_z_layers = None
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_z: torch.Tensor | None = None) -> torch.Tensor:
        # Up/down blocks resample between the activation and the conv, for h and for the skip.
        h = norm_act(self.in_layers[0], x, fused=self.fused_norm)
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_layers(emb).chunk(2, dim=1)
        z_scale = z_shift = None
        if self.emb_z_layers is not None:
            z_scale, z_shift = self.emb_z_layers(emb_z).chunk(2, dim=1)
        h = norm_act(self.out_layers[0], h, scale, shift, z_scale, z_shift, fused=self.fused_norm)
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module, FastOptions):
    def __init__(self, channels: int, num_heads: int = 1, head_channel: int = -1, new_order: bool = False):
        super().__init__()
        self.num_heads = num_heads if head_channel == -1 else channels // head_channel
        self.new_order = new_order
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, *unused) -> torch.Tensor:
        if self.channels_last:
            return self._forward_tokens(x)
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(norm_act(self.norm, x, act=False, fused=self.fused_norm))
        h = self.proj_out(qkv_attention(qkv, self.num_heads, self.new_order, self.attention))
        return (x + h).reshape(b, c, *spatial)

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on a channels_last [B, C, H, W]: seen as tokens [B, H·W, C] it is dense,
        so the 1×1 convs are plain linears, q/k/v are views with a unit stride along the head
        channels (what the fused SDPA kernels take), and the result is channels_last again; no
        layout copy anywhere (the NCHW path needs one for q/k/v)."""
        b, c, *spatial = x.shape
        h = norm_act(self.norm, x, act=False, fused=self.fused_norm)     # layout kept
        tokens = h.flatten(2).transpose(1, 2)                              # [B, T, C], a view
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)   # [B, T, 3C]
        a = qkv_attention_tokens(qkv, self.num_heads, self.new_order, self.attention)
        out = x.flatten(2).transpose(1, 2) + F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return out.transpose(1, 2).reshape(b, c, *spatial)               # channels_last, a view


class EmbedSequential(nn.ModuleList):
    """Runs its layers in order, giving ResBlocks the embeddings (the original's TimestepEmbedSequential)."""

    def forward(self, x, emb, emb_z=None):
        for layer in self:
            x = layer(x, emb, emb_z) if isinstance(layer, ResBlock) else layer(x)
        return x
