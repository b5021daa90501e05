"""Renaming rules between checkpoint layouts and this package's module names.

Three layouts exist for SD v1 weights:
- the original CompVis single file (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, ...);
- diffusers / transformers folders (`down_blocks.0.resnets.0.norm1.weight`, `text_model.encoder.layers.0...`);
- this package (`down.0.res.0.norm1.weight`): diffusers' names, shortened where they hide the idea.
Each layout maps to ours by a short table of regex renames, applied in order.
"""
from __future__ import annotations

import re

# Prefixes of the three models inside a CompVis single-file checkpoint.
COMPVIS_UNET = "model.diffusion_model."
COMPVIS_VAE = "first_stage_model."
COMPVIS_CLIP = "cond_stage_model.transformer."

# diffusers (UNet and VAE) -> this package. Order matters: specific rules first.
DIFFUSERS_RENAMES = [
    (r"^mid_block\.resnets\.0\.", "mid.res1."),
    (r"^mid_block\.resnets\.1\.", "mid.res2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"^down_blocks\.", "down."),
    (r"^up_blocks\.", "up."),
    (r"\.resnets\.", ".res."),
    (r"\.attentions\.", ".attn."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.geglu.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
    (r"^conv_norm_out\.", "norm_out."),
    # older diffusers VAE attention names
    (r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."), (r"\.proj_attn\.", ".to_out."),
]

# transformers' CLIPTextModel -> this package.
TRANSFORMERS_CLIP_RENAMES = [
    (r"^text_model\.", ""),                 # transformers < 5.6 and CompVis files keep this prefix
    (r"^embeddings\.", "embedding."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.q_proj\.", ".to_q."), (r"\.k_proj\.", ".to_k."), (r"\.v_proj\.", ".to_v."), (r"\.out_proj\.", ".to_out."),
]

# CompVis residual-block and VAE-attention parts -> diffusers' names.
COMPVIS_PART_RENAMES = [
    (r"\.in_layers\.0\.", ".norm1."), (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_emb_proj."),
    (r"\.out_layers\.0\.", ".norm2."), (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".conv_shortcut."), (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^time_embed\.0\.", "time_embedding.linear_1."), (r"^time_embed\.2\.", "time_embedding.linear_2."),
    (r"^out\.0\.", "norm_out."), (r"^out\.2\.", "conv_out."),
    (r"^input_blocks\.0\.0\.", "conv_in."),
    (r"^mid\.block_1\.", "mid.res1."), (r"^mid\.block_2\.", "mid.res2."),
    (r"^mid\.attn_1\.norm\.", "mid.attn.group_norm."),
    (r"^mid\.attn_1\.q\.", "mid.attn.to_q."), (r"^mid\.attn_1\.k\.", "mid.attn.to_k."),
    (r"^mid\.attn_1\.v\.", "mid.attn.to_v."), (r"^mid\.attn_1\.proj_out\.", "mid.attn.to_out."),
    (r"^middle_block\.0\.", "mid.res1."), (r"^middle_block\.1\.", "mid.attn."), (r"^middle_block\.2\.", "mid.res2."),
    (r"\.block\.(\d+)\.", r".res.\1."),
]


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def compvis_unet_key(key: str, layers_per_block: int, attention_levels: tuple[bool, ...]) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `down.1.attn.0.proj_in.weight` (then the shared renames)."""
    per_level = layers_per_block + 1   # residual blocks + 1 resampler (down) / 1 extra residual block (up)
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m and m.group(1) != "0":
        k, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(k - 1, per_level)
        if j == layers_per_block:                       # input_blocks.{3(i+1)}.0.op = level i's downsampler
            key = f"down.{level}.downsample.{rest.replace('op.', 'conv.', 1)}"
        else:
            key = f"down.{level}.{'res' if part == 0 else 'attn'}.{j}.{rest}"
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        k, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(k, per_level)
        has_attn = attention_levels[len(attention_levels) - 1 - level]
        if part == 0:
            key = f"up.{level}.res.{j}.{rest}"
        elif part == 1 and has_attn:
            key = f"up.{level}.attn.{j}.{rest}"
        else:                                           # `.1.conv` after a level without attention, `.2.conv` after one with
            key = f"up.{level}.upsample.{rest}"
    # then the transformer parts, named as in diffusers (`transformer_blocks`, `ff.net.0.proj`, ...)
    return rename(rename(key, COMPVIS_PART_RENAMES), DIFFUSERS_RENAMES)


def compvis_vae_key(key: str, levels: int) -> str:
    """`decoder.up.3.block.0.conv1.weight` -> `decoder.up.0.res.0.conv1.weight` (the decoder counts up levels in reverse)."""
    m = re.match(r"^decoder\.up\.(\d+)\.(.*)$", key)
    if m:
        key = f"decoder.up.{levels - 1 - int(m.group(1))}.{m.group(2)}"
    prefix, _, rest = key.partition(".")
    if prefix in ("encoder", "decoder"):
        return f"{prefix}.{rename(rest, COMPVIS_PART_RENAMES)}"
    return key   # quant_conv, post_quant_conv


def diffusers_unet_key(key: str) -> str:
    return rename(key, DIFFUSERS_RENAMES)


def diffusers_vae_key(key: str) -> str:
    """`encoder.down_blocks.0.resnets.0.conv1.weight` -> `encoder.down.0.res.0.conv1.weight`."""
    prefix, _, rest = key.partition(".")
    return f"{prefix}.{rename(rest, DIFFUSERS_RENAMES)}" if prefix in ("encoder", "decoder") else key


def transformers_clip_key(key: str) -> str:
    return rename(key, TRANSFORMERS_CLIP_RENAMES)
