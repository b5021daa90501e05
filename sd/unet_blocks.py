"""Building blocks of SD's UNet: a residual block that sees the timestep, and a spatial transformer that sees the text."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention
from .cross_attention import CrossAttention

# Normalisation epsilons in SD's UNet: CompVis' `normalization` (residual blocks) and `Normalize` (in front of a
# spatial transformer) differ. diffusers: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_condition.py#L207 (norm_eps 1e-5),
# https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_2d.py#L177 (GroupNorm 1e-6), https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention.py#L802 (LayerNorm 1e-5),
# https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention.py#L1700 (feed-forward mult 4).
RESBLOCK_NORM_EPS = 1e-5      # residual blocks and the final norm
TRANSFORMER_NORM_EPS = 1e-6   # GroupNorm in front of each spatial transformer
LAYER_NORM_EPS = 1e-5         # LayerNorms inside the transformer blocks
FF_MULT = 4                   # feed-forward inner width = 4 x model width


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the projected time embedding; GroupNorm, SiLU, conv; plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=RESBLOCK_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=RESBLOCK_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        # (B, T_dim) -> (B, C_out) -> (B, C_out, 1, 1): one shift per channel, the same at every pixel
        h = h + self.time_emb_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): value * GELU(gate), with the exact (erf) GELU."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, 2 * inner) -> two (B, T, inner) halves: value first, then gate
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.geglu = GEGLU(dim, FF_MULT * dim)
        self.out = nn.Linear(FF_MULT * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.geglu(x))   # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class TransformerBlock(nn.Module):
    """Pre-norm: self-attention over pixels, cross-attention to the text, GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = SelfAttention(dim, heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treat each pixel of a (B, C, H, W) map as a token, run transformer blocks on them, and map back."""

    def __init__(self, channels: int, context_dim: int, heads: int, depth: int = 1, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)     # SD v1: 1x1 convolutions (SD 2.x: Linear)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        # (B, C, H, W) -> (B, H*W, C)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.blocks:
            tokens = block(tokens, context)
        # (B, H*W, C) -> (B, C, H, W)
        tokens = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(tokens)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 stride-2 convolution (padding 1, unlike the VAE's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)   # (B, C, H, W) -> (B, C, H/2, W/2)
