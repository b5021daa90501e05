"""Test-side writer of the original CompVis single-file layout, from diffusers/transformers models.

Independent of `sd`'s loader on purpose: diffusers' own converter reads these files back in the tests,
so a mistake here shows up as a diffusers conversion failure, not as a silent agreement with `sd`.
"""
from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table=RESNET) -> str:
    part, _, tail = rest.partition(".")
    return f"{table.get(part, part)}.{tail}"


def unet_to_compvis(state: dict, n_layers: int = 2, attention_levels=(True, True, True, False)) -> dict:
    out, per = {}, n_layers + 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in state.items():
        name, param = k.rsplit(".", 1)
        if name in top:
            new = f"{top[name]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{per * i + j + 1}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            new = f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", k):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"output_blocks.{per * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"output_blocks.{per * int(m[1]) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            level = int(m[1])
            has_attn = attention_levels[len(attention_levels) - 1 - level]
            new = f"output_blocks.{per * level + n_layers}.{2 if has_attn else 1}.{m[2]}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_compvis(state: dict, levels: int = 4) -> dict:
    out = {}
    vae_resnet = {"conv_shortcut": "nin_shortcut"}
    for k, v in state.items():
        new = k
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.dim() == 2:
                v = v[:, :, None, None]          # CompVis stores these as 1x1 convolutions
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k):
            new = f"{m[1]}.norm_out.{m[2]}"
        out["first_stage_model." + new] = v
    return out


def clip_to_compvis(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.removeprefix("text_model.")
        out["cond_stage_model.transformer.text_model." + k] = v
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def compvis_checkpoint(ref: dict, attention_levels=(True, True, True, False)) -> dict:
    """diffusers UNet + VAE and transformers CLIP -> one CompVis-layout state dict."""
    return {**unet_to_compvis(ref["unet"].state_dict(), attention_levels=attention_levels),
            **vae_to_compvis(ref["vae"].state_dict()), **clip_to_compvis(ref["clip"].state_dict())}
