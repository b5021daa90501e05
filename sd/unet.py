"""SD's denoising UNet: (noisy latent, text context, timestep) -> predicted noise, the same shape as the latent.

Down path: 4 resolution levels, each with residual blocks (and spatial transformers in the first three),
every output saved as a skip. Mid block at the lowest resolution. Up path: each residual block first
concatenates one skip from the down path (12 skips in SD v1, the first from the input convolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .timestep_embedding import TimeEmbedding, timestep_embedding
from .layers import Upsample
from .unet_blocks import RESBLOCK_NORM_EPS, Downsample, ResBlock, SpatialTransformer
from .validation import require_context, require_image_like


class UNetLevel(nn.Module):
    """One resolution of the UNet: residual blocks, each followed by a spatial transformer where the level has
    attention; then an optional resampler. The down and up paths differ only in what happens to the skips."""

    def __init__(self, in_channels: list[int], out_ch: int, cfg: UNetConfig, attention: bool,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, cfg.time_embed_dim, cfg.norm_groups) for c in in_channels)
        self.attn = nn.ModuleList(
            SpatialTransformer(out_ch, cfg.context_dim, cfg.heads, cfg.transformer_depth, cfg.norm_groups)
            for _ in in_channels) if attention else None
        self.downsample = Downsample(out_ch) if downsample else None
        self.upsample = Upsample(out_ch) if upsample else None

    def block(self, j: int, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Residual block j (it sees the time), then its spatial transformer (it sees the text), if any."""
        x = self.res[j](x, emb)
        return x if self.attn is None else self.attn[j](x, context)


class UNetDownLevel(UNetLevel):
    """A level of the down path: every block's output, and the downsampled map, are kept as skips."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j in range(len(self.res)):
            x = self.block(j, x, emb, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)                   # (B, C, h, w) -> (B, C, h/2, w/2)
            skips.append(x)
        return x


class UNetUpLevel(UNetLevel):
    """A level of the up path: each block first concatenates the latest skip of the down path."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j in range(len(self.res)):
            x = torch.cat([x, skips.pop()], dim=1)   # (B, C, h, w) + (B, C_skip, h, w) -> (B, C + C_skip, h, w)
            x = self.block(j, x, emb, context)
        if self.upsample is not None:
            x = self.upsample(x)                     # (B, C, h, w) -> (B, C, 2h, 2w)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups)
        self.attn = SpatialTransformer(ch, cfg.context_dim, cfg.heads, cfg.transformer_depth, cfg.norm_groups)
        self.res2 = ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb), context), emb)


class DiffusionUNET(nn.Module):
    """Predict the noise in a noisy SD latent, conditioned on the text and the timestep."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch, n = cfg.block_channels, cfg.layers_per_block
        last = len(ch) - 1
        self.time_embedding = TimeEmbedding(ch[0], cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down path; remember the width of every feature map pushed as a skip.
        skip_channels = [ch[0]]
        self.down = nn.ModuleList()
        for i, out_ch in enumerate(ch):
            in_chs = [ch[max(i - 1, 0)]] + [out_ch] * (n - 1)
            self.down.append(UNetDownLevel(in_chs, out_ch, cfg, cfg.attention_levels[i], downsample=i < last))
            skip_channels += [out_ch] * (n + (i < last))

        self.mid = MidBlock(ch[-1], cfg)

        # Up path: widest level first, each residual block eats one skip (popped in reverse order).
        self.up = nn.ModuleList()
        prev = ch[-1]
        for i, out_ch in enumerate(reversed(ch)):
            in_chs = []
            for j in range(n + 1):
                in_chs.append((prev if j == 0 else out_ch) + skip_channels.pop())
            self.up.append(UNetUpLevel(in_chs, out_ch, cfg, cfg.attention_levels[last - i], upsample=i < last))
            prev = out_ch

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=RESBLOCK_NORM_EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, timestep,
                down_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """down_residuals (one per skip, 12 in SD) and mid_residual: a ControlNet's outputs, added to the skips and
        to the middle block's output (sd/controlnet.py)."""
        cfg = self.config
        require_image_like(latent, "latent", cfg.in_channels, cfg.downsample_factor,
                           "the UNet halves the latent 3 times, i.e. images in multiples of 64 pixels")
        b = latent.shape[0]
        context = require_context(context, cfg.context_dim, b)
        t = self._timesteps(timestep, b, latent.device)

        # (B,) -> (B, 320) sinusoids -> (B, 1280)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_channels[0]).to(latent.dtype))

        x = self.conv_in(latent)                     # (B, 4, h, w) -> (B, 320, h, w)
        skips = [x]
        for level in self.down:
            x = level(x, emb, context, skips)        # pushes its skips
        if down_residuals is not None:               # ControlNet: each skip gets its residual, same shape
            skips = [s + r for s, r in zip(skips, self._check_residuals(down_residuals, skips, "down_residuals"))]
        x = self.mid(x, emb, context)
        if mid_residual is not None:
            x = x + self._check_residuals([mid_residual], [x], "mid_residual")[0]
        for level in self.up:
            x = level(x, emb, context, skips)        # pops one skip per residual block

        return self.conv_out(F.silu(self.norm_out(x)))   # (B, 320, h, w) -> (B, 4, h, w)

    @staticmethod
    def _check_residuals(residuals: list[torch.Tensor], maps: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """A ControlNet's residuals must match the feature maps they are added to, one for one."""
        if len(residuals) != len(maps):
            raise ValueError(f"{name} must hold one tensor per skip ({len(maps)}), got {len(residuals)}")
        for i, (r, m) in enumerate(zip(residuals, maps)):
            if not isinstance(r, torch.Tensor) or r.shape != m.shape:
                got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                where = f"{name}[{i}]" if len(maps) > 1 else name
                raise ValueError(f"{where} must have shape {tuple(m.shape)} (a ControlNet's output), got {got}")
        return residuals

    @staticmethod
    def _timesteps(timestep, b: int, device) -> torch.Tensor:
        """An int, a 0-d tensor or a (B,) tensor -> a (B,) tensor of timesteps."""
        t = torch.as_tensor(timestep, device=device)
        if t.dim() == 0:
            return t.expand(b)
        if t.dim() == 1 and t.shape[0] in (1, b):
            return t.expand(b)
        raise ValueError(f"timestep must be an int, a 0-d tensor or a ({b},) tensor, got shape {tuple(t.shape)}")
