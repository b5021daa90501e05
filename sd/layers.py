"""Layers that the VAE and the UNet share: the nearest-neighbour upsampler."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Both models upsample by 2 per level (CompVis ldm/modules/diffusionmodules/model.py `Upsample` and
# openaimodel.py `Upsample`: nearest x2, then a 3x3 conv with padding 1).
UPSAMPLE_FACTOR = 2.0


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv (the VAE decoder and the UNet's up path)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=UPSAMPLE_FACTOR, mode="nearest"))
