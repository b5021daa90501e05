"""The pieces of a multimodal diffusion transformer (MMDiT, SD3: Esser et al. 2024, section 4 and figure 2).

- patchify / unpatchify: a latent (B, C, H, W) <-> a sequence of (H/p)(W/p) patch tokens of p*p*C numbers;
- positions: fixed 2D sine-cosine features of each patch's row and column (DiT, Peebles & Xie 2023, section 3.2);
- adaLN-zero: LayerNorm whose shift and scale, and a gate on the residual, come from the conditioning vector
  (timestep + pooled text); the layer that makes them starts at zero, so every block starts as the identity
  (DiT, section 3.2, "adaLN-Zero block");
- joint attention: text and image tokens, each with their own projections, attend to each other in one softmax
  (SD3, section 4: "we concatenate the sequences of the two modalities for the attention operation");
- the final layer: adaLN (shift and scale only), then a linear map back to p*p*C numbers per patch, zero at the start.

Where the numbers come from: [SD3] Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", arXiv:2403.03206; [DIT] Peebles & Xie 2023, "Scalable Diffusion Models with Transformers",
arXiv:2212.09748, and its code https://github.com/facebookresearch/DiT/blob/00d70acc18e08f7c131d2c9bc94158dfa189d95b/models.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .timestep_embedding import timestep_embedding

# LayerNorm without learned affine parameters (adaLN supplies shift and scale), eps 1e-6: [DIT] models.py `DiTBlock`.
NORM_EPS = 1e-6
# Six modulation vectors per stream and block: shift, scale, gate for attention, then for the MLP ([DIT] `DiTBlock`).
BLOCK_MODULATIONS = 6
# The final layer has no residual, so no gate: shift and scale ([DIT] `FinalLayer`).
FINAL_MODULATIONS = 2


# --- patches -------------------------------------------------------------------------------------------------------

def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): patches in reading order (row by row), each patch's numbers in the
    order (row in patch, column in patch, channel)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // p, p, w // p, p)            # (B, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                           # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, (h/p)(w/p), p*p*C) -> (B, C, h, w): the inverse of patchify for a latent of h x w."""
    b, n, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, h // p, w // p, p, p, c)            # (B, H/p, W/p, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                           # (B, C, H/p, p, W/p, p)
    return x.reshape(b, c, h, w)


def grid_positions(rows: int, cols: int, dim: int, device=None) -> torch.Tensor:
    """(rows * cols, dim) fixed position features: half the numbers say the row, half the column, each as the
    sinusoids of the timestep embedding (DiT's 2D sin-cos embedding, [DIT] section 3.2). Any grid size works."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)     # (N,) row of each patch, reading order
    c = torch.arange(cols, device=device).repeat(rows)                # (N,) column of each patch
    return torch.cat([timestep_embedding(r, dim // 2), timestep_embedding(c, dim // 2)], dim=-1)


# --- adaLN-zero ----------------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) normalised elsewhere; shift and scale (B, D), one per sample: x (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """The conditioning vector (B, D) -> `count` vectors (B, D): SiLU, then one linear layer initialised to zero,
    so that every shift, scale and gate is 0 at the start (adaLN-zero, [DIT] section 3.2)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).chunk(self.count, dim=-1)     # count x (B, D)


class FeedForward(nn.Module):
    """Linear, GELU (tanh approximation, as SD3 and DiT), Linear: D -> mlp_ratio D -> D."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Stream(nn.Module):
    """One modality's weights in an MMDiT block: its adaLN-zero modulation, its q/k/v and output projections, its
    MLP. SD3 gives text and image tokens separate weights because the two are so different ([SD3] section 4)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.modulation = Modulation(dim, BLOCK_MODULATIONS)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = FeedForward(dim, mlp_ratio)

    def pre_attention(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Normalise, modulate, project: (B, N, D) -> q, k, v side by side (B, N, 3D), and the modulations for later."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond)    # 6 x (B, D)
        qkv = self.qkv(modulate(self.norm1(x), shift_a, scale_a))                     # (B, N, 3D)
        return qkv, (gate_a, shift_m, scale_m, gate_m)

    def post_attention(self, x: torch.Tensor, attended: torch.Tensor, mods: tuple) -> torch.Tensor:
        """The gated residuals: x + gate_a * out(attention), then x + gate_m * MLP(modulated norm of x)."""
        gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a[:, None] * self.out(attended)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


# --- joint attention -----------------------------------------------------------------------------------------------

def joint_attention(image_qkv: torch.Tensor, text_qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention over both modalities: (B, N, 3D) and (B, T, 3D) -> outputs (B, N, D) and (B, T, D).

    Each token's query meets the keys of all N + T tokens (image first, then text, as diffusers orders them);
    softmax(q k^T / sqrt(d)) v per head, then the sequence is split back into its two parts.
    """
    n = image_qkv.shape[1]
    qkv = torch.cat([image_qkv, text_qkv], dim=1)                    # (B, N + T, 3D)
    b, length, three_d = qkv.shape
    d_head = three_d // 3 // heads
    q, k, v = qkv.reshape(b, length, 3, heads, d_head).permute(2, 0, 3, 1, 4)   # 3 x (B, H, N + T, d)
    out = attention(q, k, v)                                          # (B, H, N + T, d)
    out = out.transpose(1, 2).reshape(b, length, heads * d_head)      # (B, N + T, D)
    return out[:, :n], out[:, n:]


class MMDiTBlock(nn.Module):
    """One block: each stream modulates and projects its tokens, they attend jointly, each adds its gated results
    ([SD3] figure 2b). With every modulation zero the block returns both sequences unchanged."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.image = Stream(dim, mlp_ratio)
        self.text = Stream(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: image tokens (B, N, D); c: text tokens (B, T, D); cond: timestep + pooled text (B, D)."""
        x_qkv, x_mods = self.image.pre_attention(x, cond)
        c_qkv, c_mods = self.text.pre_attention(c, cond)
        x_att, c_att = joint_attention(x_qkv, c_qkv, self.heads)
        return self.image.post_attention(x, x_att, x_mods), self.text.post_attention(c, c_att, c_mods)


# --- the final layer -----------------------------------------------------------------------------------------------

class FinalLayer(nn.Module):
    """Image tokens (B, N, D) -> (B, N, p*p*C_out): adaLN (shift and scale from the conditioning), then a linear
    layer initialised to zero, so that the untrained model predicts 0 ([DIT] models.py `FinalLayer`)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.modulation = Modulation(dim, FINAL_MODULATIONS)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond)                          # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))
