"""Model configs read off tensor shapes (our key names), so any checkpoint with SD v1's layout loads at any width.

What shapes cannot tell (head counts, the latent scale) comes from the config defaults or from what the file says.
"""
from __future__ import annotations

import re

import torch

from ..config import CLIPConfig, UNetConfig, VAEConfig

# CLIP's attention heads are 64 wide (ViT-L/14: width 768 / 12 heads), used when a file does not say how many heads:
# https://github.com/mlfoundations/open_clip/blob/89fb801f1e6087880e951fc8354b8a2077b79c6d/src/open_clip/model_configs/ViT-L-14.json#L12-L13
CLIP_HEAD_WIDTH = 64


class MissingWeight(ValueError):
    """A weight the config is read from is not in the checkpoint (`key` in our names, for the caller to translate)."""

    def __init__(self, key: str, what: str):
        super().__init__(f"missing `{key}` ({what}); is this an SD v1.x checkpoint?")
        self.key, self.what = key, what


def prefix_count(state: dict, pattern: str) -> int:
    """How many distinct values the (\\d+) in `pattern` takes among the keys."""
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _shape(state: dict, key: str, what: str) -> torch.Size:
    if key not in state:
        raise MissingWeight(key, what)
    return state[key].shape


def infer_unet_config(s: dict, given: dict | None = None) -> UNetConfig:
    """Widths, levels, blocks and attention placement of a UNet; heads from `given`, else SD v1's default."""
    levels = prefix_count(s, r"^down\.(\d+)\.res\.0\.conv1\.weight$")
    if levels == 0:
        _shape(s, "down.0.res.0.conv1.weight", "the UNet's first residual block")
    ctx_key = next((k for k in s if k.endswith("attn2.to_k.weight")), None)
    cfg = dict(
        in_channels=_shape(s, "conv_in.weight", "UNet input conv")[1],
        out_channels=_shape(s, "conv_out.weight", "UNet output conv")[0],
        block_channels=tuple(_shape(s, f"down.{i}.res.0.conv1.weight", "UNet level")[0] for i in range(levels)),
        layers_per_block=prefix_count(s, r"^down\.0\.res\.(\d+)\.conv1\.weight$"),
        attention_levels=tuple(f"down.{i}.attn.0.proj_in.weight" in s for i in range(levels)),
        context_dim=s[ctx_key].shape[1] if ctx_key else UNetConfig().context_dim,
        transformer_depth=max(1, prefix_count(s, r"^mid\.attn\.blocks\.(\d+)\.norm1\.weight$")),
    )
    return UNetConfig.from_dict({**cfg, **(given or {})})


def infer_vae_config(s: dict, given: dict | None = None) -> VAEConfig:
    levels = prefix_count(s, r"^encoder\.down\.(\d+)\.res\.0\.conv1\.weight$")
    if levels == 0:
        _shape(s, "encoder.down.0.res.0.conv1.weight", "the VAE encoder's first residual block")
    cfg = dict(
        in_channels=_shape(s, "encoder.conv_in.weight", "VAE encoder input conv")[1],
        latent_channels=_shape(s, "decoder.conv_in.weight", "VAE decoder input conv")[1],
        block_channels=tuple(_shape(s, f"encoder.down.{i}.res.0.conv1.weight", "VAE level")[0] for i in range(levels)),
        layers_per_block=prefix_count(s, r"^encoder\.down\.0\.res\.(\d+)\.conv1\.weight$"),
    )
    return VAEConfig.from_dict({**cfg, **(given or {})})


def infer_clip_config(s: dict, given: dict | None = None) -> CLIPConfig:
    vocab, width = _shape(s, "embedding.token_embedding.weight", "CLIP token embedding")
    cfg = dict(
        vocab_size=vocab, width=width,
        max_tokens=_shape(s, "embedding.position_embedding.weight", "CLIP position embedding")[0],
        layers=prefix_count(s, r"^layers\.(\d+)\.layer_norm1\.weight$"),
        heads=max(1, width // CLIP_HEAD_WIDTH),
        mlp_width=_shape(s, "layers.0.mlp.fc1.weight", "CLIP MLP")[0],
    )
    return CLIPConfig.from_dict({**cfg, **(given or {})})
