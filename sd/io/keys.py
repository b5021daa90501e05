"""Renaming rules between checkpoint layouts and this package's module names, both ways.

Three layouts exist for SD v1 weights:
- the original CompVis single file (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, ...);
- diffusers / transformers folders (`down_blocks.0.resnets.0.norm1.weight`, `text_model.encoder.layers.0...`);
- this package (`down.0.res.0.norm1.weight`): diffusers' names, shortened where they hide the idea.
Each table is a list of (their name, our name) pairs, applied in order: forward to read a file, backward to name a
key in the file's own layout (in error messages). A leading `^` anchors a pair at the start of the key; the others
match whole dotted components anywhere.
"""
from __future__ import annotations

import re

# Prefixes of the three models inside a CompVis single-file checkpoint.
COMPVIS_UNET = "model.diffusion_model."
COMPVIS_VAE = "first_stage_model."
COMPVIS_CLIP = "cond_stage_model.transformer."
# transformers < 5.6 and CompVis files put CLIP's weights under this prefix; transformers >= 5.6 drops it.
CLIP_TEXT_MODEL = "text_model."

# Inside a spatial transformer: the same in CompVis and diffusers files.
TRANSFORMER_PARTS = [
    ("transformer_blocks.", "blocks."),
    ("to_out.0.", "to_out."),
    ("ff.net.0.proj.", "ff.geglu.proj."),
    ("ff.net.2.", "ff.out."),
]

# diffusers (UNet and VAE, after `encoder.` / `decoder.`) -> this package. Order matters: specific pairs first.
DIFFUSERS_RENAMES = [
    ("^mid_block.resnets.0.", "mid.res1."),
    ("^mid_block.resnets.1.", "mid.res2."),
    ("^mid_block.attentions.0.", "mid.attn."),
    ("^down_blocks.", "down."),
    ("^up_blocks.", "up."),
    ("resnets.", "res."),
    ("attentions.", "attn."),
    ("downsamplers.0.", "downsample."),
    ("upsamplers.0.", "upsample."),
    *TRANSFORMER_PARTS,
    ("^conv_norm_out.", "norm_out."),
]
# Older diffusers VAE attention names: read, never written back.
LEGACY_DIFFUSERS_RENAMES = [("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.")]

# transformers' CLIPTextModel (after `text_model.`) -> this package.
TRANSFORMERS_CLIP_RENAMES = [
    ("^embeddings.", "embedding."),
    ("^encoder.layers.", "layers."),
    ("q_proj.", "to_q."), ("k_proj.", "to_k."), ("v_proj.", "to_v."), ("out_proj.", "to_out."),
]

# CompVis UNet: the top-level modules, and the parts of a residual block (`ResBlock` in openaimodel.py).
COMPVIS_UNET_TOP = [
    ("^time_embed.0.", "time_embedding.linear_1."), ("^time_embed.2.", "time_embedding.linear_2."),
    ("^out.0.", "norm_out."), ("^out.2.", "conv_out."), ("^input_blocks.0.0.", "conv_in."),
]
COMPVIS_RESNET_PARTS = [
    ("^in_layers.0.", "norm1."), ("^in_layers.2.", "conv1."), ("^emb_layers.1.", "time_emb_proj."),
    ("^out_layers.0.", "norm2."), ("^out_layers.3.", "conv2."), ("^skip_connection.", "conv_shortcut."),
]
# CompVis VAE (after `encoder.` / `decoder.`; the residual blocks already use norm1/conv1/norm2/conv2).
COMPVIS_VAE_PARTS = [
    ("^mid.block_1.", "mid.res1."), ("^mid.block_2.", "mid.res2."),
    ("^mid.attn_1.norm.", "mid.attn.group_norm."),
    ("^mid.attn_1.q.", "mid.attn.to_q."), ("^mid.attn_1.k.", "mid.attn.to_k."),
    ("^mid.attn_1.v.", "mid.attn.to_v."), ("^mid.attn_1.proj_out.", "mid.attn.to_out."),
    ("block.", "res."), ("nin_shortcut.", "conv_shortcut."),
]


def _pattern(name: str) -> str:
    """`^a.b.` matches at the start only; `a.b.` matches whole components anywhere."""
    if name.startswith("^"):
        return "^" + re.escape(name[1:])
    return r"(?<![^.])" + re.escape(name)


def rename(key: str, pairs: list[tuple[str, str]], back: bool = False) -> str:
    """Apply (theirs, ours) pairs in order: theirs -> ours, or ours -> theirs with back=True."""
    for theirs, ours in pairs:
        source, target = (ours, theirs) if back else (theirs, ours)
        key = re.sub(_pattern(source), lambda _: target.removeprefix("^"), key)
    return key


# --- the CompVis UNet: block numbers depend on blocks per level and on where attention sits -------------------------

def compvis_unet_key(key: str, layers_per_block: int, attention_levels: tuple[bool, ...]) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `down.1.attn.0.proj_in.weight` (key without `model.diffusion_model.`)."""
    per_level = layers_per_block + 1   # residual blocks + 1 resampler (down) / residual blocks (up)
    top = rename(key, COMPVIS_UNET_TOP)
    if top != key:
        return top
    if m := re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", key):
        level, j = divmod(int(m[1]) - 1, per_level)
        if j == layers_per_block and m[2] == "0":      # input_blocks.{3(i+1)}.0.op = level i's downsampler
            return f"down.{level}.downsample.{m[3].replace('op.', 'conv.', 1)}"
        if m[2] == "0":
            return f"down.{level}.res.{j}.{rename(m[3], COMPVIS_RESNET_PARTS)}"
        if m[2] == "1":
            return f"down.{level}.attn.{j}.{rename(m[3], TRANSFORMER_PARTS)}"
    if m := re.match(r"^middle_block\.([012])\.(.*)$", key):
        if m[1] == "1":
            return f"mid.attn.{rename(m[2], TRANSFORMER_PARTS)}"
        return f"mid.res{1 + int(m[1]) // 2}.{rename(m[2], COMPVIS_RESNET_PARTS)}"
    if m := re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", key):
        level, j = divmod(int(m[1]), per_level)
        if level >= len(attention_levels):
            return key
        has_attn = attention_levels[len(attention_levels) - 1 - level]   # up level i mirrors down level n-1-i
        if m[2] == "0":
            return f"up.{level}.res.{j}.{rename(m[3], COMPVIS_RESNET_PARTS)}"
        if m[2] == "1" and has_attn:
            return f"up.{level}.attn.{j}.{rename(m[3], TRANSFORMER_PARTS)}"
        if m[2] == ("2" if has_attn else "1"):         # `.1.conv` after a level without attention, `.2.conv` after one
            return f"up.{level}.upsample.{m[3]}"
    return key                                          # not a UNet weight: reported as unexpected, by its own name


def compvis_unet_file_key(key: str, layers_per_block: int, attention_levels: tuple[bool, ...]) -> str:
    """The inverse of `compvis_unet_key`: `down.1.attn.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
    per_level = layers_per_block + 1
    top = rename(key, COMPVIS_UNET_TOP, back=True)
    if top != key:
        return top
    if m := re.match(r"^down\.(\d+)\.(res|attn)\.(\d+)\.(.*)$", key):
        block = per_level * int(m[1]) + int(m[3]) + 1
        if m[2] == "res":
            return f"input_blocks.{block}.0.{rename(m[4], COMPVIS_RESNET_PARTS, back=True)}"
        return f"input_blocks.{block}.1.{rename(m[4], TRANSFORMER_PARTS, back=True)}"
    if m := re.match(r"^down\.(\d+)\.downsample\.conv\.(.*)$", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"^mid\.(res1|attn|res2)\.(.*)$", key):
        if m[1] == "attn":
            return f"middle_block.1.{rename(m[2], TRANSFORMER_PARTS, back=True)}"
        return f"middle_block.{0 if m[1] == 'res1' else 2}.{rename(m[2], COMPVIS_RESNET_PARTS, back=True)}"
    if m := re.match(r"^up\.(\d+)\.(res|attn)\.(\d+)\.(.*)$", key):
        block = per_level * int(m[1]) + int(m[3])
        if m[2] == "res":
            return f"output_blocks.{block}.0.{rename(m[4], COMPVIS_RESNET_PARTS, back=True)}"
        return f"output_blocks.{block}.1.{rename(m[4], TRANSFORMER_PARTS, back=True)}"
    if m := re.match(r"^up\.(\d+)\.upsample\.(.*)$", key):
        level = int(m[1])
        has_attn = attention_levels[len(attention_levels) - 1 - level]
        return f"output_blocks.{per_level * level + layers_per_block}.{2 if has_attn else 1}.{m[2]}"
    return key


# --- the CompVis VAE: the decoder numbers its levels in reverse -----------------------------------------------------

def compvis_vae_key(key: str, levels: int) -> str:
    """`decoder.up.3.block.0.conv1.weight` -> `decoder.up.0.res.0.conv1.weight` (key without `first_stage_model.`)."""
    if m := re.match(r"^decoder\.up\.(\d+)\.(.*)$", key):
        key = f"decoder.up.{levels - 1 - int(m[1])}.{m[2]}"
    prefix, _, rest = key.partition(".")
    return f"{prefix}.{rename(rest, COMPVIS_VAE_PARTS)}" if prefix in ("encoder", "decoder") else key


def compvis_vae_file_key(key: str, levels: int) -> str:
    """The inverse of `compvis_vae_key`."""
    prefix, _, rest = key.partition(".")
    if prefix not in ("encoder", "decoder"):
        return key                                      # quant_conv, post_quant_conv
    key = f"{prefix}.{rename(rest, COMPVIS_VAE_PARTS, back=True)}"
    if m := re.match(r"^decoder\.up\.(\d+)\.(.*)$", key):
        key = f"decoder.up.{levels - 1 - int(m[1])}.{m[2]}"
    return key


# --- diffusers folders and transformers' CLIP ---------------------------------------------------------------------

def diffusers_unet_key(key: str) -> str:
    return rename(key, DIFFUSERS_RENAMES)


def diffusers_vae_key(key: str) -> str:
    """`encoder.down_blocks.0.resnets.0.conv1.weight` -> `encoder.down.0.res.0.conv1.weight`."""
    prefix, _, rest = key.partition(".")
    if prefix not in ("encoder", "decoder"):
        return key
    return f"{prefix}.{rename(rename(rest, LEGACY_DIFFUSERS_RENAMES), DIFFUSERS_RENAMES)}"


def diffusers_file_key(key: str) -> str:
    """The inverse of `diffusers_unet_key` and `diffusers_vae_key` (today's diffusers names)."""
    prefix, _, rest = key.partition(".")
    if prefix in ("encoder", "decoder"):
        return f"{prefix}.{rename(rest, DIFFUSERS_RENAMES, back=True)}"
    return rename(key, DIFFUSERS_RENAMES, back=True)


def transformers_clip_key(key: str) -> str:
    return rename(key.removeprefix(CLIP_TEXT_MODEL), TRANSFORMERS_CLIP_RENAMES)


def transformers_clip_file_key(key: str, prefix: str = CLIP_TEXT_MODEL) -> str:
    """The inverse of `transformers_clip_key`, with the `text_model.` prefix the file uses (or none)."""
    return prefix + rename(key, TRANSFORMERS_CLIP_RENAMES, back=True)
