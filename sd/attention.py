"""Multi-head self-attention: softmax(Q K^T / sqrt(d)) V, as in "Attention Is All You Need" (Vaswani et al. 2017, eq. 1).

Two paths compute the same thing: the explicit one that learners write, and PyTorch's fused
`scaled_dot_product_attention` (less memory, faster), which the models use by default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Models call `attention(...)` with this default; set `sd.attention.USE_SDPA = False` to run the explicit path.
USE_SDPA = True


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, written out. q: (B, H, Tq, d), k and v: (B, H, Tk, d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    # (B, H, Tq, d) @ (B, H, d, Tk) -> (B, H, Tq, Tk)
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        # token i may only look at tokens 0..i: mask the strict upper triangle with -inf
        t_q, t_k = scores.shape[-2:]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.softmax(dim=-1)
    # (B, H, Tq, Tk) @ (B, H, Tk, d) -> (B, H, Tq, d)
    return weights @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              use_sdpa: bool | None = None, slice_size: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention over heads; fused kernel unless `use_sdpa=False`.

    slice_size: compute `slice_size` heads at a time (attention slicing: less peak memory, same result).
    """
    if use_sdpa is None:
        use_sdpa = USE_SDPA
    if slice_size is not None and slice_size < q.shape[1]:
        # (B, H, T, d) -> slices of (B, slice_size, T, d) along the heads, each attended on its own
        return torch.cat([attention(q[:, i:i + slice_size], k[:, i:i + slice_size], v[:, i:i + slice_size],
                                    causal, use_sdpa) for i in range(0, q.shape[1], slice_size)], dim=1)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return explicit_attention(q, k, v, causal=causal)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, C/H): each head sees its own C/H-wide slice of the features."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, C/H) -> (B, T, C): the inverse of `split_heads`."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence (B, T, C).

    `qkv_bias=False` is the UNet's choice (its q/k/v projections have no bias); CLIP and the VAE use biases.
    The output projection always has a bias.
    """

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} must split evenly into {n_heads} heads"
        self.n_heads = n_heads
        self.slice_size: int | None = None   # attention slicing, see `attention`
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        # (B, T, C) -> (B, H, T, C/H) for each of q, k, v
        q = split_heads(self.to_q(x), self.n_heads)
        k = split_heads(self.to_k(x), self.n_heads)
        v = split_heads(self.to_v(x), self.n_heads)
        # (B, H, T, C/H) -> (B, T, C)
        out = merge_heads(attention(q, k, v, causal=causal, slice_size=self.slice_size))
        return self.to_out(out)
