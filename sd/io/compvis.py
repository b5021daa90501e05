"""The original CompVis single-file layout (`v1-5-pruned-emaonly.safetensors`): split into three models, renamed.

One file holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and CLIP under
`cond_stage_model.transformer.`, next to the noise schedule and, in unpruned files, the EMA copy.
"""
from __future__ import annotations

import re
from functools import partial

import torch

from . import keys
from .infer import prefix_count
from .weights import KeyNaming, Weights, key_list, renamed
from ..config import UNetConfig

# Entries of a CompVis file that are not model weights: the noise schedule buffers (`register_schedule` in
# https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/models/diffusion/ddpm.py#L136-L168),
# the EMA copy (`model_ema.*`, dots dropped from the names, ldm/modules/ema.py#L19), `logvar` (ddpm.py#L112) and
# the VAE's training loss.
IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus",
                    "posterior_", "lvlb_weights", "logvar", keys.COMPVIS_VAE + "loss.")


def split_compvis(raw: dict[str, torch.Tensor], where: str) -> Weights:
    """A CompVis single-file state dict -> the UNet, VAE and CLIP state dicts in this package's names."""
    unet_raw, vae_raw, clip_raw, unknown = {}, {}, {}, []
    for k, v in raw.items():
        if k.startswith(keys.COMPVIS_UNET):
            unet_raw[k[len(keys.COMPVIS_UNET):]] = v
        elif k.startswith(keys.COMPVIS_VAE) and not k.startswith(IGNORED_PREFIXES):
            vae_raw[k[len(keys.COMPVIS_VAE):]] = v
        elif k.startswith(keys.COMPVIS_CLIP):
            clip_raw[k[len(keys.COMPVIS_CLIP):]] = v
        elif not k.startswith(IGNORED_PREFIXES):
            unknown.append(k)
    if unknown:
        raise ValueError(f"unexpected entries in the checkpoint: {key_list(unknown)} (expected "
                         f"{keys.COMPVIS_UNET}*, {keys.COMPVIS_VAE}*, {keys.COMPVIS_CLIP}*)")
    # The UNet's CompVis numbering depends on blocks per level and where attention sits: read both off the keys.
    ops = sorted(int(m[1]) for k in unet_raw if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.weight$", k)))
    layers_per_block = ops[0] - 1 if ops else UNetConfig().layers_per_block
    levels = len(ops) + 1
    attn = tuple(f"input_blocks.{1 + i * (layers_per_block + 1)}.1.proj_in.weight" in unet_raw for i in range(levels))
    vae_levels = prefix_count(vae_raw, r"^encoder\.down\.(\d+)\.")
    clip_prefix = keys.CLIP_TEXT_MODEL if any(k.startswith(keys.CLIP_TEXT_MODEL) for k in clip_raw) else ""

    unet, unet_keys = renamed(unet_raw, partial(keys.compvis_unet_key, layers_per_block=layers_per_block,
                                                attention_levels=attn))
    vae, vae_keys = renamed(vae_raw, partial(keys.compvis_vae_key, levels=vae_levels))
    vae = {k: _conv1x1_to_linear(k, v) for k, v in vae.items()}
    clip, clip_keys = renamed(clip_raw, keys.transformers_clip_key)
    naming = KeyNaming(
        files=dict.fromkeys(("unet", "vae", "clip"), where),
        original={"unet": _prefixed(unet_keys, keys.COMPVIS_UNET), "vae": _prefixed(vae_keys, keys.COMPVIS_VAE),
                  "clip": _prefixed(clip_keys, keys.COMPVIS_CLIP)},
        back={"unet": lambda k: keys.COMPVIS_UNET + keys.compvis_unet_file_key(k, layers_per_block, attn),
              "vae": lambda k: keys.COMPVIS_VAE + keys.compvis_vae_file_key(k, vae_levels),
              "clip": lambda k: keys.COMPVIS_CLIP + keys.transformers_clip_file_key(k, clip_prefix)})
    return Weights({"unet": unet, "vae": vae, "clip": clip}, naming)


def _prefixed(original: dict[str, str], prefix: str) -> dict[str, str]:
    return {ours: prefix + theirs for ours, theirs in original.items()}


def _conv1x1_to_linear(key: str, v: torch.Tensor) -> torch.Tensor:
    """The CompVis VAE attention stores q/k/v/proj_out as [C, C, 1, 1] conv weights; ours are [C, C] Linear."""
    if ".attn." in key and key.endswith("weight") and v.dim() == 4:
        return v[:, :, 0, 0]   # (C, C, 1, 1) -> (C, C)
    return v
