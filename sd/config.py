"""Model sizes as small dataclasses: SD v1.5 by default, and a `tiny()` preset of the same structure.

The tiny presets keep every module name and state-dict key of SD v1.5 (4 resolution levels,
2 residual blocks per level on the way down, 3 on the way up, attention in the same places),
only with small widths, so tests and notebooks run in milliseconds on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Where SD v1's sizes come from (commit-pinned; the line is given beside each constant as [NAME]#L<line>):
# [SD_V1_CONFIG] the UNet, the VAE and the latent scale, CompVis' inference config:
#   https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/configs/stable-diffusion/v1-inference.yaml
# [SD_V1_CODE] CompVis' model code at the same commit (GroupNorm groups):
#   https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/
# [CLIP_VIT_L14_CONFIG] the text encoder (OpenAI's ViT-L/14 text tower), open_clip's model config:
#   https://github.com/mlfoundations/open_clip/blob/89fb801f1e6087880e951fc8354b8a2077b79c6d/src/open_clip/model_configs/ViT-L-14.json
# [SD3_CONFIG] SD3 Medium's transformer config (diffusers layout; a Hub file, so no git commit to pin):
#   https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/transformer/config.json
# [CLIP_CODE] open_clip's model code at the same commit (the MLP ratio):
#   https://github.com/mlfoundations/open_clip/blob/89fb801f1e6087880e951fc8354b8a2077b79c6d/src/open_clip/model.py

# SD v1 latent scaling: `scale_factor: 0.18215`, [SD_V1_CONFIG]#L17.
LATENT_SCALE = 0.18215
# Width of CLIP's context window, every prompt becomes exactly 77 tokens: `context_length`, [CLIP_VIT_L14_CONFIG]#L10.
CLIP_MAX_TOKENS = 77
# CLIP's byte-level BPE vocabulary, 256 bytes x 2 + 48,894 merges + 2 special tokens: [CLIP_VIT_L14_CONFIG]#L11.
CLIP_VOCAB_SIZE = 49408


class _Config:
    """Shared helpers: round-trip through a plain dict (saved as checkpoint metadata)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The inverse of `to_dict`; a key the config does not have is an error, not silently dropped."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                             f"valid fields: {', '.join(names)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class VAEConfig(_Config):
    in_channels: int = 3            # RGB (`in_channels: 3`, [SD_V1_CONFIG]#L55)
    latent_channels: int = 4        # SD's latent space has 4 channels (`z_channels: 4`, [SD_V1_CONFIG]#L53)
    # one entry per resolution level: `ch: 128` x `ch_mult: [1, 2, 4, 4]`, [SD_V1_CONFIG]#L57-L62
    block_channels: tuple = (128, 256, 512, 512)
    # residual blocks per level in the encoder, decoder +1: `num_res_blocks: 2`, [SD_V1_CONFIG]#L63
    layers_per_block: int = 2
    norm_groups: int = 32           # GroupNorm groups (`Normalize(..., num_groups=32)`, [SD_V1_CODE]model.py#L38)
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
    width: int = 768                # ViT-L/14 text tower ([CLIP_VIT_L14_CONFIG]#L12)
    layers: int = 12                # [CLIP_VIT_L14_CONFIG]#L14
    heads: int = 12                 # [CLIP_VIT_L14_CONFIG]#L13
    mlp_width: int = 3072           # 4 x width (`mlp_ratio: float = 4.0`, [CLIP_CODE]#L92)

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        # keeps CLIP's 64-wide heads, so a file's head count can be read off its widths
        return cls(width=128, layers=2, heads=2, mlp_width=512)


@dataclass(frozen=True)
class UNetConfig(_Config):
    in_channels: int = 4            # latent channels (`in_channels: 4`, [SD_V1_CONFIG]#L33)
    out_channels: int = 4           # predicted noise has the latent's shape ([SD_V1_CONFIG]#L34)
    # `model_channels: 320` x `channel_mult: [1, 2, 4, 4]`, [SD_V1_CONFIG]#L35 and #L38
    block_channels: tuple = (320, 640, 1280, 1280)
    # residual blocks per level on the way down, up +1: `num_res_blocks: 2`, [SD_V1_CONFIG]#L37
    layers_per_block: int = 2
    # levels with spatial transformers: `attention_resolutions: [4, 2, 1]` (downsampling factors), [SD_V1_CONFIG]#L36
    attention_levels: tuple = (True, True, True, False)
    heads: int = 8                  # 8 heads in every attention, head size varies (`num_heads: 8`, [SD_V1_CONFIG]#L39)
    context_dim: int = 768          # width of the CLIP text embedding (`context_dim: 768`, [SD_V1_CONFIG]#L42)
    transformer_depth: int = 1      # transformer blocks per spatial transformer ([SD_V1_CONFIG]#L41)
    norm_groups: int = 32           # GroupNorm groups (`GroupNorm32(32, channels)`, [SD_V1_CODE]util.py#L205)
    sample_size: int = 64           # native latents 64 x 64 = 512 x 512 images (`image_size: 64`, [SD_V1_CONFIG]#L12)

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


@dataclass(frozen=True)
class MMDiTConfig(_Config):
    """A multimodal diffusion transformer (SD3's MMDiT, sd/mmdit.py). The defaults are SD3 Medium's widths; the
    latent channels and the text width are SD v1's (SD3's VAE has 16 channels and its text is 4096 wide)."""
    in_channels: int = 4            # latent channels (SD3: 16, `in_channels` in [SD3_CONFIG])
    out_channels: int = 4           # the velocity has the latent's shape
    patch_size: int = 2             # 2 x 2 latent pixels per token (`patch_size: 2`, [SD3_CONFIG])
    width: int = 1536               # token width: 24 heads of 64 (`num_attention_heads: 24`, `attention_head_dim: 64`)
    depth: int = 24                 # MMDiT blocks (`num_layers: 24`, [SD3_CONFIG])
    heads: int = 24
    mlp_ratio: float = 4.0          # MLP hidden width / token width (SD3 and DiT use 4)
    context_dim: int = 768          # width of the text states (CLIP's output; SD3's joint text is 4096 wide)
    sample_size: int = 64           # the latent side it is trained at (SD3 Medium: 128)
    shift: float = 1.0              # SD3's time shift for sampling (sd/flow_matching.py; SD3 at 1024 px uses 3.0)

    @classmethod
    def tiny(cls) -> "MMDiTConfig":
        return cls(width=64, depth=2, heads=2, context_dim=CLIPConfig.tiny().width, sample_size=8)

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per token, per side: the latent's sides must be multiples of it."""
        return self.patch_size
