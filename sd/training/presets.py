"""Model sizes for training on the shapes dataset: the same `sd` classes as SD v1.5, only small.

"small" made the shipped default model: 32 x 32 images, a 3-level VAE (4x down) to 8 x 8 x 4 latents, a
2-layer CLIP text encoder, and a 3-level UNet (8 -> 4 -> 2) with cross-attention on the two coarse levels; and the
shipped transformer: 4 MMDiT blocks 128 wide over 64 one-pixel patches and the 77 text tokens.
"tiny" is for tests: a few steps run in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import CLIPConfig, MMDiTConfig, UNetConfig, VAEConfig


@dataclass(frozen=True)
class Preset:
    """Sizes of the three models, plus the image-side models only training needs."""

    vae: VAEConfig
    clip: CLIPConfig               # vocab_size is set from the learned tokenizer
    unet: UNetConfig               # context_dim = clip.width; sample_size = image size / VAE downsampling
    image_encoder_width: int       # width of the CNN the text encoder is trained against (CLIP's image tower)
    embed_dim: int                 # joint image-text embedding width of the contrastive stage
    num_merges: int                # BPE merges learned from the captions
    mmdit: MMDiTConfig             # the transformer stage's model (context_dim, sample_size set like the UNet's)


PRESETS = {
    "small": Preset(
        vae=VAEConfig(block_channels=(32, 64, 64), layers_per_block=1, norm_groups=16),
        clip=CLIPConfig(width=64, layers=2, heads=2, mlp_width=256),
        unet=UNetConfig(block_channels=(64, 96, 96), layers_per_block=1, attention_levels=(False, True, True),
                        heads=4, context_dim=64, norm_groups=32),
        image_encoder_width=32, embed_dim=64, num_merges=150,
        # 8 x 8 latents: 1-pixel patches keep 64 tokens (2 x 2 would leave 16); about the UNet's time per step
        mmdit=MMDiTConfig(patch_size=1, width=128, depth=4, heads=4, context_dim=64, sample_size=8)),
    "tiny": Preset(
        vae=VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4),
        clip=CLIPConfig(width=32, layers=1, heads=2, mlp_width=64),
        unet=UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
                        heads=2, context_dim=32, norm_groups=8),
        image_encoder_width=8, embed_dim=16, num_merges=120,
        mmdit=MMDiTConfig(patch_size=1, width=32, depth=1, heads=2, context_dim=32, sample_size=4)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
