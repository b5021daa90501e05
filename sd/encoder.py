"""The VAE encoder: an image (B, 3, H, W) in [-1, 1] -> a scaled latent (B, 4, H/8, W/8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .vae_blocks import VAE_Downsample, VAE_ResidualBlock, VAEMidBlock, vae_norm
from .validation import require_image_like

# Bounds on the posterior's log-variance, from `DiagonalGaussianDistribution` (CompVis' and diffusers'):
# https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L694
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAEDownLevel(nn.Module):
    """One resolution level of the encoder: residual blocks, then (except at the last level) a 2x downsample."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.res = nn.ModuleList(
            VAE_ResidualBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n_blocks))
        self.downsample = VAE_Downsample(out_ch) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VAE_Encoder(nn.Module):
    """Compress an image 8x per side into SD's 4-channel latent space, sampling the posterior with the given noise."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        ch, groups = config.block_channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            VAEDownLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.mid = VAEMidBlock(ch[-1], groups)
        self.norm_out = vae_norm(ch[-1], groups)
        # mean and log-variance of the posterior, 4 channels each
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> mean and log-variance, each (B, 4, H/8, W/8), unscaled."""
        require_image_like(image, "image", self.config.in_channels, self.config.downsample_factor,
                           "the VAE downsamples 8x")
        x = self.conv_in(image)
        for level in self.down:
            x = level(x)               # (B, C_i, H, W) -> (B, C_i, H/2, W/2) except at the last level
        x = self.mid(x)
        x = self.conv_out(F.silu(self.norm_out(x)))
        x = self.quant_conv(x)         # (B, 8, H/8, W/8)
        mean, logvar = x.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample z = mean + std * noise (the reparameterization trick), scaled by 0.18215. noise=None: the mean."""
        mean, logvar = self.posterior(image)
        if noise is None:
            latent = mean
        else:
            if noise.shape != mean.shape:
                raise ValueError(f"noise must have the latent's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
            std = torch.exp(0.5 * logvar)
            latent = mean + std * noise
        return latent * self.config.scaling_factor
