"""CLIP's text encoder (the ViT-L/14 text tower SD v1 conditions on): tokens (B, 77) -> embeddings (B, 77, 768)."""
from __future__ import annotations

import torch
from torch import nn

from .attention import SelfAttention
from .config import CLIPConfig

# LayerNorm epsilon in CLIP (PyTorch's default too): https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/clip/configuration_clip.py#L55
CLIP_NORM_EPS = 1e-5
# Quick-GELU, x * sigmoid(1.702 x): the cheap GELU approximation CLIP was trained with (Hendrycks & Gimpel 2016, sec. 2);
# https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/activations.py#L123
QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class CLIPEmbedding(nn.Module):
    """Token embedding plus a learned position embedding for each of the 77 positions."""

    def __init__(self, vocab_size: int, width: int, max_tokens: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_tokens, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        # (B, T) -> (B, T, C), plus (T, C) broadcast over the batch
        return self.token_embedding(tokens) + self.position_embedding(positions)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(LN(x)) with a causal mask, then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.self_attn = SelfAttention(width, heads, qkv_bias=True)
        self.layer_norm2 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.mlp = CLIPMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # causal: token i sees tokens 0..i only, as in a language model (CLIP's text tower was trained that way)
        x = x + self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.mlp(self.layer_norm2(x))


class CLIP(nn.Module):
    """Token ids (B, 77) -> the last hidden state after the final LayerNorm (B, 77, width): SD's text condition."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPConfig()
        self.embedding = CLIPEmbedding(config.vocab_size, config.width, config.max_tokens)
        self.layers = nn.ModuleList(CLIPLayer(config.width, config.heads, config.mlp_width) for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width, eps=CLIP_NORM_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        x = self.embedding(tokens)        # (B, T) -> (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)   # (B, T, C)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, {cfg.max_tokens}) tensor of token ids; "
                             f"got {getattr(tokens, 'shape', type(tokens).__name__)} (use sd.CLIPTokenizer to make them)")
        if tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer ids (torch.long), got {tokens.dtype}")
        if tokens.shape[1] > cfg.max_tokens:
            raise ValueError(f"tokens may be at most {cfg.max_tokens} long (CLIP's context), got {tokens.shape[1]}; "
                             "the tokenizer truncates long prompts")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
