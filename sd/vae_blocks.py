"""Building blocks of the VAE encoder and decoder: residual block, single-head attention, downsampling, mid block.

The upsampler, which the UNet uses too, is in sd/layers.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention

# GroupNorm epsilon everywhere in SD's VAE (not PyTorch's default 1e-5): CompVis' `Normalize` uses 1e-6, as does
# diffusers, https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L124 (resnet_eps) and #L147 (conv_norm_out).
VAE_NORM_EPS = 1e-6


def vae_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=VAE_NORM_EPS)


class VAE_ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus a skip (1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = vae_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class VAE_AttentionBlock(SelfAttention):
    """Single-head self-attention over all pixels (scale 1/sqrt(C)), with a residual connection."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(channels, n_heads=1, qkv_bias=True)
        self.group_norm = vae_norm(channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C): every pixel is a token
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = super().forward(tokens)
        # (B, H*W, C) -> (B, C, H, W)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + out


class VAE_Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one pixel, then a 3x3 stride-2 conv without padding.

    The asymmetric (0, 1, 0, 1) padding is SD's (CompVis) choice; symmetric padding gives other numbers.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H+1, W+1) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEMidBlock(nn.Module):
    """Residual block, single-head attention, residual block: at the lowest resolution (VAE encoder and decoder)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.res1 = VAE_ResidualBlock(channels, channels, groups)
        self.attn = VAE_AttentionBlock(channels, groups)
        self.res2 = VAE_ResidualBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))
