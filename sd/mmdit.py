"""SD3's denoiser in miniature: a multimodal diffusion transformer (MMDiT) that predicts the flow's velocity.

(noisy latent, text states, time) -> velocity, the latent's shape (Esser et al. 2024, section 4, figure 2):
  1. the latent is cut into p x p patches, each a token (linear projection), plus fixed 2D position features;
  2. the text states get their own linear projection to the same width: text tokens;
  3. the time (sinusoids -> MLP) plus the pooled text (MLP) make one conditioning vector per sample;
  4. depth x MMDiT block: each modality normalised and modulated by the conditioning (adaLN-zero), both attend
     jointly, each adds its gated attention and MLP outputs;
  5. the final layer turns each image token back into a patch of velocity; unpatchify.

What changes against the UNet (sd/unet.py): no convolutions, one resolution throughout (no down and up levels, no
skips), and the text is not read by cross-attention from the image side only: text tokens are in the same
sequence and are updated by the blocks as well. The time and pooled text enter through every norm (adaLN), where
the UNet adds the time embedding into each residual block.

Pooled text: SD3 adds CLIP's pooled embeddings; the model here is given only the text states, so it pools them
by their mean over the tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MMDiTConfig
from .mmdit_blocks import FinalLayer, MMDiTBlock, grid_positions, patchify, unpatchify
from .timestep_embedding import TimeEmbedding, timestep_embedding
from .validation import require_context, require_image_like

# Sinusoid features of the time before its MLP: 256 in DiT and SD3 (DiT's `TimestepEmbedder`
# `frequency_embedding_size=256`; diffusers' `CombinedTimestepTextProjEmbeddings`: `Timesteps(num_channels=256)`).
TIME_FEATURES = 256
# The model reads the time as SD3's transformer does: t in [0, 1] times 1000 (`timestep = sigma * 1000`).
TIME_SCALE = 1000


class MMDiT(nn.Module):
    """Predict the velocity eps - x0 of a noisy latent x_t = (1 - t) x0 + t eps, conditioned on the text and t."""

    def __init__(self, config: MMDiTConfig | None = None):
        super().__init__()
        self.config = cfg = config or MMDiTConfig()
        if cfg.width % cfg.heads or cfg.width % 4:
            raise ValueError(f"width {cfg.width} must be divisible by heads {cfg.heads} and by 4 (2D positions)")
        d, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d)      # (B, N, p*p*C) -> (B, N, D)
        self.context_embed = nn.Linear(cfg.context_dim, d)           # (B, T, C_text) -> (B, T, D)
        self.time_embed = TimeEmbedding(TIME_FEATURES, d)            # (B, 256) -> (B, D)
        self.pooled_embed = TimeEmbedding(cfg.context_dim, d)        # same MLP shape: Linear, SiLU, Linear
        self.blocks = nn.ModuleList(MMDiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(d, p, cfg.out_channels)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, timestep) -> torch.Tensor:
        """latent (B, C, h, w); context (B or 1, T, C_text); timestep: 1000 t, an int/float, 0-d or (B,) tensor."""
        cfg = self.config
        p = cfg.patch_size
        require_image_like(latent, "latent", cfg.in_channels, p,
                           f"the transformer cuts the latent into {p}x{p} patches")
        b, _, h, w = latent.shape
        context = require_context(context, cfg.context_dim, b)
        t = self._timesteps(timestep, b, latent.device)

        # the conditioning vector: time + pooled text, (B, D)
        cond = self.time_embed(timestep_embedding(t, TIME_FEATURES).to(latent.dtype)) \
            + self.pooled_embed(context.mean(dim=1))
        # the two sequences: (B, N, D) image tokens with their positions, (B, T, D) text tokens
        x = self.patch_embed(patchify(latent, p))
        x = x + grid_positions(h // p, w // p, cfg.width, latent.device).to(x.dtype)
        c = self.context_embed(context)
        for block in self.blocks:
            x, c = block(x, c, cond)
        return unpatchify(self.final(x, cond), p, h, w)              # (B, N, p*p*C) -> (B, C, h, w)

    @staticmethod
    def _timesteps(timestep, b: int, device) -> torch.Tensor:
        """A number, a 0-d tensor or a (B,) tensor -> a (B,) float tensor of times in [0, 1000]."""
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] in (1, b)):
            if not torch.isfinite(t).all():
                raise ValueError("timestep must be finite")
            return t.expand(b)
        raise ValueError(f"timestep must be a number, a 0-d tensor or a ({b},) tensor, got shape {tuple(t.shape)}")
