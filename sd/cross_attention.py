"""Cross-attention: the image (queries) attends to the text (keys and values).

This is how the prompt steers the UNet: every latent pixel asks "which words matter here?".
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention, merge_heads, split_heads


class CrossAttention(nn.Module):
    """Multi-head attention from a (B, T, C) sequence to a (B, S, D) context; q/k/v without bias as in SD's UNet."""

    def __init__(self, dim: int, context_dim: int, n_heads: int):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} must split evenly into {n_heads} heads"
        self.n_heads = n_heads
        self.slice_size: int | None = None   # attention slicing, see `sd.attention.attention`
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)   # text width D -> image width C
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # queries from the image: (B, T, C) -> (B, H, T, C/H)
        q = split_heads(self.to_q(x), self.n_heads)
        # keys and values from the text: (B, S, D) -> (B, S, C) -> (B, H, S, C/H)
        k = split_heads(self.to_k(context), self.n_heads)
        v = split_heads(self.to_v(context), self.n_heads)
        # (B, H, T, C/H) -> (B, T, C)
        return self.to_out(merge_heads(attention(q, k, v, slice_size=self.slice_size)))
