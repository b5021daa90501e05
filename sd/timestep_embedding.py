"""Sinusoidal timestep embedding (the Transformer's positional encoding, applied to the diffusion step t)."""
from __future__ import annotations

import math

import torch
from torch import nn

# Longest period of the sinusoids, as in the Transformer (Vaswani et al. 2017, sec. 3.5); diffusers:
# https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/embeddings.py#L33, with SD's cos-first order (flip_sin_to_cos) at https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_condition.py#L184.
MAX_PERIOD = 10000


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) features [cos(t*f_i), sin(t*f_i)], f_i = exp(-ln(10000) * i / (dim/2)).

    SD v1 puts cos first, then sin (the order matters: swapped, the UNet output moves by ~0.2).
    """
    half = dim // 2
    # (half,) frequencies from 1 down to 1/10000, geometric
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    # (B, 1) * (1, half) -> (B, half)
    args = timesteps.float()[:, None] * freqs[None, :]
    # (B, half) + (B, half) -> (B, dim)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal features: Linear, SiLU, Linear (320 -> 1280 -> 1280 in SD v1)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_features)))
