"""Model sizes as small dataclasses: SD v1.5 by default, and a `tiny()` preset of the same structure.

The tiny presets keep every module name and state-dict key of SD v1.5 (4 resolution levels,
2 residual blocks per level on the way down, 3 on the way up, attention in the same places),
only with small widths, so tests and notebooks run in milliseconds on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# SD v1 latent scaling, from the original training config (`scale_factor: 0.18215`).
LATENT_SCALE = 0.18215
# Width of CLIP's context window: every prompt becomes exactly 77 tokens.
CLIP_MAX_TOKENS = 77
# CLIP's byte-level BPE vocabulary: 256 bytes x 2 + 48,894 merges + 2 special tokens.
CLIP_VOCAB_SIZE = 49408


class _Config:
    """Shared helpers: round-trip through a plain dict (saved as checkpoint metadata)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kwargs)


@dataclass(frozen=True)
class VAEConfig(_Config):
    in_channels: int = 3            # RGB
    latent_channels: int = 4        # SD's latent space has 4 channels
    block_channels: tuple = (128, 256, 512, 512)   # one entry per resolution level
    layers_per_block: int = 2       # residual blocks per level in the encoder (decoder: +1)
    norm_groups: int = 32
    scaling_factor: float = LATENT_SCALE

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_channels=(32, 32, 64, 64))

    @property
    def downsample_factor(self) -> int:
        # one stride-2 convolution between consecutive levels: 2^(levels-1) = 8 for SD
        return 2 ** (len(self.block_channels) - 1)


@dataclass(frozen=True)
class CLIPConfig(_Config):
    vocab_size: int = CLIP_VOCAB_SIZE
    max_tokens: int = CLIP_MAX_TOKENS
    width: int = 768                # ViT-L/14 text tower
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072           # 4 x width

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        # keeps CLIP's 64-wide heads, so a file's head count can be read off its widths
        return cls(width=128, layers=2, heads=2, mlp_width=512)


@dataclass(frozen=True)
class UNetConfig(_Config):
    in_channels: int = 4            # latent channels
    out_channels: int = 4           # predicted noise has the latent's shape
    block_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2       # residual blocks per level on the way down (up: +1)
    attention_levels: tuple = (True, True, True, False)  # levels with spatial transformers
    heads: int = 8                  # SD v1: 8 heads in every attention (head size varies)
    context_dim: int = 768          # width of the CLIP text embedding
    transformer_depth: int = 1      # transformer blocks per spatial transformer
    norm_groups: int = 32
    sample_size: int = 64           # native latent size: 64 x 64 latents = 512 x 512 images for SD v1.5

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_channels=(32, 64, 64, 64), context_dim=CLIPConfig.tiny().width)

    @property
    def time_embed_dim(self) -> int:
        # SD: 320 -> 1280, four times the first level's width
        return 4 * self.block_channels[0]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)
