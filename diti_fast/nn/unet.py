"""The frozen DDPM UNet and DiTi's ShiftUNet (the shift decoder G).

ShiftUNet holds the whole DDPM under the original's top-level names (time_embed, input_blocks,
middle_block, output_blocks, out) plus the trainable branch (label_emb, shift_middle_block,
shift_output_blocks, shift_out). The shift branch starts from the last input block's output and
reuses the frozen skips; it returns (eps_hat, G).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..config import UNetConfig
from .blocks import (AttentionBlock, EmbedSequential, FastOptions, ResBlock, group_norm, norm_act, timestep_embedding,
                     to_layout, zero_)


def _decoder_path(cfg: UNetConfig, ch: int, input_chans: list[int], ds: int, emb_dim: int,
                  z_conditioned: bool) -> tuple[nn.ModuleList, int]:
    """Output blocks mirroring the encoder path: (num_res_blocks + 1) ResBlocks per level."""
    blocks = nn.ModuleList()
    chans = list(input_chans)
    attn = dict(num_heads=cfg.num_heads, head_channel=cfg.head_channel, new_order=cfg.use_new_attention_order)
    for level, mult in list(enumerate(cfg.channel_multiplier))[::-1]:
        for i in range(cfg.num_residual_blocks_of_a_block + 1):
            out_ch = int(cfg.base_channel * mult)
            layers = [ResBlock(ch + chans.pop(), emb_dim, cfg.dropout, out_ch, z_conditioned=z_conditioned)]
            ch = out_ch
            if ds in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch, **attn))
            if level and i == cfg.num_residual_blocks_of_a_block:
                layers.append(ResBlock(ch, emb_dim, cfg.dropout, ch, up=True, z_conditioned=z_conditioned))
                ds //= 2
            blocks.append(EmbedSequential(layers))
    return blocks, ch


def _middle(ch: int, emb_dim: int, cfg: UNetConfig, z_conditioned: bool) -> EmbedSequential:
    attn = dict(num_heads=cfg.num_heads, head_channel=cfg.head_channel, new_order=cfg.use_new_attention_order)
    return EmbedSequential([ResBlock(ch, emb_dim, cfg.dropout, z_conditioned=z_conditioned),
                            AttentionBlock(ch, **attn),
                            ResBlock(ch, emb_dim, cfg.dropout, z_conditioned=z_conditioned)])


class UNet(nn.Module, FastOptions):
    """Guided-diffusion ε-prediction UNet: forward(x_t, t) -> ε̂."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.base_channel
        emb_dim = 4 * c0
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = int(cfg.channel_multiplier[0] * c0)
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(cfg.input_channel, ch, 3, padding=1)])])
        chans, ds = [ch], 1
        attn = dict(num_heads=cfg.num_heads, head_channel=cfg.head_channel, new_order=cfg.use_new_attention_order)
        for level, mult in enumerate(cfg.channel_multiplier):
            for _ in range(cfg.num_residual_blocks_of_a_block):
                layers = [ResBlock(ch, emb_dim, cfg.dropout, int(mult * c0))]
                ch = int(mult * c0)
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, **attn))
                self.input_blocks.append(EmbedSequential(layers))
                chans.append(ch)
            if level != len(cfg.channel_multiplier) - 1:
                self.input_blocks.append(EmbedSequential([ResBlock(ch, emb_dim, cfg.dropout, ch, down=True)]))
                chans.append(ch)
                ds *= 2
        self._skip_chans, self._bottom_ch, self._bottom_ds = list(chans), ch, ds
        self.middle_block = _middle(ch, emb_dim, cfg, z_conditioned=False)
        self.output_blocks, ch = _decoder_path(cfg, ch, chans, ds, emb_dim, z_conditioned=False)
        c_in = int(cfg.channel_multiplier[0] * c0)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_(nn.Conv2d(c_in, cfg.input_channel, 3, padding=1)))

    # -- pieces shared with ShiftUNet
    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.cfg.base_channel)  # float32, as the original
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        return hs

    def decode(self, hs: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        hs = list(hs)
        h = self.middle_block(hs[-1], emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.head(self.out, h)

    def head(self, seq: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        """GN -> SiLU -> zero conv (``out`` / ``shift_out``)."""
        return seq[2](norm_act(seq[0], h, fused=self.fused_norm))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed_time(t)
        return self.decode(self.encode(to_layout(x, self.channels_last), emb), emb)


FROZEN = ("time_embed", "input_blocks", "middle_block", "output_blocks", "out")
TRAINABLE = ("label_emb", "shift_middle_block", "shift_output_blocks", "shift_out")


class ShiftUNet(UNet):
    """DiTi's decoder: forward(x_t, t, z ⊙ m_t) -> (ε̂ from the frozen DDPM, G from the shift branch)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        emb_dim = 4 * cfg.base_channel
        self.label_emb = nn.Linear(cfg.latent_dim, emb_dim)  # default init: no zero-init here
        self.shift_middle_block = _middle(self._bottom_ch, emb_dim, cfg, z_conditioned=True)
        self.shift_output_blocks, ch = _decoder_path(cfg, self._bottom_ch, self._skip_chans, self._bottom_ds,
                                                     emb_dim, z_conditioned=True)
        c_in = int(cfg.channel_multiplier[0] * cfg.base_channel)
        self.shift_out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                       zero_(nn.Conv2d(c_in, cfg.input_channel, 3, padding=1)))
        self.frozen_no_grad = True
        self.freeze()

    def freeze(self) -> None:
        for name in FROZEN:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        # The frozen DDPM always runs in eval mode (no dropout on the frozen path).
        super().train(mode)
        for name in FROZEN:
            getattr(self, name).eval()
        return self

    def trainable_parameters(self):
        for name in TRAINABLE:
            yield from getattr(self, name).parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        # Nothing upstream of the frozen path is trainable, so it needs no autograd graph: running it
        # under no_grad saves every frozen activation (roughly half the step's memory).
        frozen_ctx = torch.no_grad() if self.frozen_no_grad else contextlib.nullcontext()
        with frozen_ctx:
            emb = self.embed_time(t)
            hs = self.encode(to_layout(x, self.channels_last), emb)
            eps = self.decode(hs, emb)
        emb_z = self.label_emb(cond)
        h = self.shift_middle_block(hs[-1], emb, emb_z)
        for block in self.shift_output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, emb_z)
        return eps, self.head(self.shift_out, h)
