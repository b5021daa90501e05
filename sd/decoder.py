"""The VAE decoder: a scaled latent (B, 4, h, w) -> an image (B, 3, 8h, 8w) in about [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .layers import Upsample
from .vae_blocks import VAE_ResidualBlock, VAEMidBlock, vae_norm
from .validation import require_image_like


class VAEUpLevel(nn.Module):
    """One resolution level of the decoder: residual blocks, then (except at the last level) a 2x upsample."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList(
            VAE_ResidualBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n_blocks))
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class VAE_Decoder(nn.Module):
    """Turn SD latents back into pixels; the mirror image of the encoder, one more residual block per level."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        ch, groups = tuple(reversed(config.block_channels)), config.norm_groups   # widest first: 512, 512, 256, 128
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid = VAEMidBlock(ch[0], groups)
        self.up = nn.ModuleList(
            VAEUpLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.norm_out = vae_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], config.in_channels, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        require_image_like(latent, "latent", self.config.latent_channels, 1, "SD latents")
        x = latent / self.config.scaling_factor       # undo the 0.18215 scaling of the encoder
        x = self.conv_in(self.post_quant_conv(x))     # (B, 4, h, w) -> (B, 512, h, w)
        x = self.mid(x)
        for level in self.up:
            x = level(x)                               # (B, C, h, w) -> (B, C', 2h, 2w) except at the last level
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, 8h, 8w)
