"""Reading ControlNet files safely (no code runs), in the two layouts they come in, widths read off the shapes.

- diffusers: a `ControlNetModel` folder (config.json + diffusion_pytorch_model.safetensors) or one such file
  (`controlnet_cond_embedding.*`, `down_blocks.*`, `mid_block.*`, `controlnet_down_blocks.{0..11}`,
  `controlnet_mid_block`);
- lllyasviel's original ControlNet 1.0 / 1.1 files, .pth (read with weights-only loading) or .safetensors:
  `control_model.input_hint_block.*`, `control_model.input_blocks.*` (the CompVis UNet's numbering),
  `control_model.zero_convs.{0..11}.0`, `control_model.middle_block_out.0`. ControlNet 1.0's files also hold the
  whole SD model they were trained with (`model.diffusion_model.*`, ...): skipped, the pipeline has its own.
A weight that is missing, unexpected or of the wrong shape is a one-line error naming the key as the file spells it.
`save_controlnet` writes one .safetensors file in diffusers' names, with what shapes cannot tell (the head count)
in its metadata, as `save_checkpoint` does for the SD models.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path

import torch

from . import keys
from .compvis import IGNORED_PREFIXES
from .family import require_sd_v1
from .infer import MissingWeight, prefix_count
from .safe_read import read_tensors, save_safetensors, stored_configs, unwrap_state_dict
from .weights import key_list, naming_the_file, renamed
from ..config import UNetConfig
from ..controlnet import ControlNet, ControlNetConfig

# This package's metadata entry for a ControlNet's config (inside the `sd_config` JSON, beside 'unet', 'vae', 'clip').
CONFIG_PART = "controlnet"
# What a saved config contributes at load time: what the shapes cannot tell.
NOT_IN_SHAPES = ("heads", "norm_groups", "sample_size")
# Weight files of a diffusers ControlNetModel folder, in order of preference.
CONTROLNET_WEIGHT_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
# Prefix of the ControlNet inside an original file (`ControlLDM.control_model`, lllyasviel/ControlNet cldm/cldm.py).
ORIGINAL_PREFIX = "control_model."
# The rest of SD inside a ControlNet 1.0 file: not the ControlNet's, skipped.
SD_PREFIXES = (keys.COMPVIS_UNET, keys.COMPVIS_VAE, keys.COMPVIS_CLIP, "cond_stage_model.", *IGNORED_PREFIXES)

# diffusers' ControlNet-only modules -> ours (the encoder copy uses the UNet's table, keys.DIFFUSERS_RENAMES).
DIFFUSERS_CONTROLNET_RENAMES = [
    ("^controlnet_cond_embedding.", "cond_embedding."),
    ("^controlnet_down_blocks.", "zero_convs."),
    ("^controlnet_mid_block.", "mid_zero_conv."),
]
# The original's zero convolutions sit in a one-module `TimestepEmbedSequential` (hence the `.0.`).
ORIGINAL_CONTROLNET_RENAMES = [
    (r"^zero_convs\.(\d+)\.0\.", r"zero_convs.\1."),
    (r"^middle_block_out\.0\.", "mid_zero_conv."),
]


# --- key rules --------------------------------------------------------------------------------------------------------

def _controlnet_only(key: str, pairs) -> bool:
    return any(key.startswith(theirs.removeprefix("^")) for theirs, _ in pairs)


def diffusers_controlnet_key(key: str) -> str:
    """`controlnet_down_blocks.3.weight` -> `zero_convs.3.weight`; `down_blocks.0...` as in the UNet."""
    if _controlnet_only(key, DIFFUSERS_CONTROLNET_RENAMES):
        return keys.rename(key, DIFFUSERS_CONTROLNET_RENAMES)
    return keys.diffusers_unet_key(key)


def diffusers_controlnet_file_key(key: str) -> str:
    """The inverse of `diffusers_controlnet_key`."""
    if key.startswith(("cond_embedding.", "zero_convs.", "mid_zero_conv.")):
        return keys.rename(key, DIFFUSERS_CONTROLNET_RENAMES, back=True)
    return keys.diffusers_file_key(key)


def original_controlnet_key(key: str, hint_convs: int, layers_per_block: int, attention_levels: tuple) -> str:
    """A key of an original file, without `control_model.` -> ours. The hint block is a Sequential of convolutions
    with a SiLU after each but the last: convs at 0, 2, 4, ...: the first is `conv_in`, the last `conv_out`."""
    if m := re.match(r"^input_hint_block\.(\d+)\.(.*)$", key):
        index = int(m[1]) // 2
        part = "conv_in" if index == 0 else "conv_out" if index == hint_convs - 1 else f"blocks.{index - 1}"
        return f"cond_embedding.{part}.{m[2]}"
    for pattern, ours in ORIGINAL_CONTROLNET_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, ours, key)
    return keys.compvis_unet_key(key, layers_per_block, attention_levels)


def original_controlnet_file_key(key: str, hint_convs: int, layers_per_block: int, attention_levels: tuple) -> str:
    """The inverse of `original_controlnet_key`, with `control_model.` in front."""
    if m := re.match(r"^cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)$", key):
        index = 0 if m[1] == "conv_in" else hint_convs - 1 if m[1] == "conv_out" else int(m[2]) + 1
        return f"{ORIGINAL_PREFIX}input_hint_block.{2 * index}.{m[3]}"
    if m := re.match(r"^zero_convs\.(\d+)\.(.*)$", key):
        return f"{ORIGINAL_PREFIX}zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("mid_zero_conv."):
        return ORIGINAL_PREFIX + "middle_block_out.0." + key.removeprefix("mid_zero_conv.")
    return ORIGINAL_PREFIX + keys.compvis_unet_file_key(key, layers_per_block, attention_levels)


# --- the config, read off the shapes ---------------------------------------------------------------------------------

def infer_controlnet_config(s: dict, given: dict | None = None) -> ControlNetConfig:
    """Widths, levels, blocks, attention placement and the hint embedding's widths (our key names)."""
    def shape(key: str, what: str) -> torch.Size:
        if key not in s:
            raise MissingWeight(key, what)
        return s[key].shape

    levels = prefix_count(s, r"^down\.(\d+)\.res\.0\.conv1\.weight$")
    if levels == 0:
        shape("down.0.res.0.conv1.weight", "the ControlNet's first residual block")
    hint_blocks = prefix_count(s, r"^cond_embedding\.blocks\.(\d+)\.weight$")
    ctx_key = next((k for k in s if k.endswith("attn2.to_k.weight")), None)
    cfg = dict(
        in_channels=shape("conv_in.weight", "ControlNet input conv")[1],
        block_channels=tuple(shape(f"down.{i}.res.0.conv1.weight", "ControlNet level")[0] for i in range(levels)),
        layers_per_block=prefix_count(s, r"^down\.0\.res\.(\d+)\.conv1\.weight$"),
        attention_levels=tuple(f"down.{i}.attn.0.proj_in.weight" in s for i in range(levels)),
        context_dim=s[ctx_key].shape[1] if ctx_key else UNetConfig().context_dim,
        transformer_depth=max(1, prefix_count(s, r"^mid\.attn\.blocks\.(\d+)\.norm1\.weight$")),
        conditioning_channels=shape("cond_embedding.conv_in.weight", "the control image's first conv")[1],
        # the width after every stride-2 conv (blocks 1, 3, 5), after the first conv's
        embedding_channels=(shape("cond_embedding.conv_in.weight", "the control image's first conv")[0],
                            *(shape(f"cond_embedding.blocks.{j}.weight", "the control image's convs")[0]
                              for j in range(1, hint_blocks, 2))),
    )
    return ControlNetConfig.from_dict({**cfg, **(given or {})})


# --- reading a source ------------------------------------------------------------------------------------------------

def load_controlnet(source, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ControlNet:
    """A diffusers ControlNetModel folder or file, or an original ControlNet 1.0/1.1 file -> a ControlNet, eval."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a ControlNet must be given as the path of a folder or file (a str or pathlib.Path), got "
                        f"{type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no ControlNet at {path}")
    given = {}
    if path.is_dir():
        given = _folder_config(path)
        found = next((path / f for f in CONTROLNET_WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise ValueError(f"{path} is not a diffusers ControlNet folder: no weights (expected one of "
                             f"{', '.join(CONTROLNET_WEIGHT_FILES)})")
        path = found
    raw, metadata = read_tensors(path)
    raw = unwrap_state_dict(raw)
    saved = stored_configs(metadata, path).get(CONFIG_PART, {})
    given = {**given, **{k: saved[k] for k in NOT_IN_SHAPES if k in saved}}
    with naming_the_file(path):
        state, file_key = _to_our_names(raw)
        try:
            config = infer_controlnet_config(state, given)
        except MissingWeight as e:
            raise ValueError(f"missing `{file_key(e.key)}` ({e.what}); is this an SD v1.x ControlNet?") from None
        net = _load_strict(ControlNet(config), state, file_key)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_controlnet(net: ControlNet, path: str | Path) -> Path:
    """Write a ControlNet as one .safetensors file in diffusers' names; its config rides in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {diffusers_controlnet_file_key(k): v for k, v in net.state_dict().items()}
    save_safetensors(tensors, path, {CONFIG_PART: net.config.to_dict()})
    return path


def _to_our_names(raw: dict[str, torch.Tensor]):
    """Which layout the file has, its state dict in our names, and our key -> the file's key."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in raw) or any(k.startswith("input_hint_block.") for k in raw):
        # `control_model.*`, or (files cut out of one) the same keys without the prefix; the rest of SD is skipped
        prefix = ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in raw) else ""
        ours = [k for k in raw if k.startswith(prefix) and not k.startswith(SD_PREFIXES)]
        stray = [k for k in raw if k not in ours and not k.startswith(SD_PREFIXES)]
        if stray:
            raise ValueError(f"unexpected entries in the ControlNet file: {key_list(stray)} "
                             f"(expected {ORIGINAL_PREFIX}*)")
        theirs = {k[len(prefix):]: raw[k] for k in ours}
        require_sd_v1(theirs)
        hint_convs = prefix_count(theirs, r"^input_hint_block\.(\d+)\.weight$")
        ops = sorted(int(m[1]) for k in theirs if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.weight$", k)))
        per_level = ops[0] - 1 if ops else UNetConfig().layers_per_block          # as in compvis.split_compvis
        attn = tuple(f"input_blocks.{1 + i * (per_level + 1)}.1.proj_in.weight" in theirs
                     for i in range(len(ops) + 1))
        state, original = renamed(theirs, partial(original_controlnet_key, hint_convs=hint_convs,
                                                  layers_per_block=per_level, attention_levels=attn))
        back = partial(original_controlnet_file_key, hint_convs=hint_convs, layers_per_block=per_level,
                       attention_levels=attn)
        return state, lambda k: prefix + original[k] if k in original else back(k)
    if not any(k.startswith("controlnet_cond_embedding.") for k in raw):
        raise ValueError("not a ControlNet: no `controlnet_cond_embedding.*` (diffusers) or "
                         f"`{ORIGINAL_PREFIX}input_hint_block.*` (original) weights")
    require_sd_v1(raw)
    state, original = renamed(raw, diffusers_controlnet_key)
    return state, lambda k: original.get(k) or diffusers_controlnet_file_key(k)


def _load_strict(net: ControlNet, state: dict[str, torch.Tensor], file_key) -> ControlNet:
    """Copy weights strictly; name what is missing, unexpected or misshapen as the file spells it (as
    sd.io.checkpoint.load_into does for the SD models)."""
    expected = net.state_dict()
    missing = [file_key(k) for k in expected if k not in state]
    unexpected = [file_key(k) for k in state if k not in expected]
    if missing or unexpected:
        found = ([f"missing {key_list(missing)}"] if missing else []) + \
                ([f"unexpected {key_list(unexpected)}"] if unexpected else [])
        raise ValueError("ControlNet weights do not fit SD v1.x's layout: " + "; ".join(found))
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"ControlNet weight `{file_key(k)}` has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    net.load_state_dict(state, strict=True)
    return net


def _folder_config(folder: Path) -> dict:
    """What a diffusers ControlNet's config.json says that shapes cannot (the head count, GroupNorm groups)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got a {type(config).__name__}")
    given = {}
    if isinstance(config.get("attention_head_dim"), int):   # diffusers' legacy name for SD v1's head count
        given["heads"] = config["attention_head_dim"]
    if isinstance(config.get("norm_num_groups"), int):
        given["norm_groups"] = config["norm_num_groups"]
    if config.get("global_pool_conditions"):
        raise ValueError(f"{path}: a global-pooling ControlNet (shuffle-type, `global_pool_conditions`) is not "
                         "supported")
    return given
