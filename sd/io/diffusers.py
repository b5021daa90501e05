"""diffusers-format model folders (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`) and their config.json files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import keys
from .family import require_sd_v1
from .safe_read import read_tensors, unwrap_state_dict
from .weights import KeyNaming, Weights, naming_the_file, renamed

# Weight files inside a diffusers folder, in order of preference (the fp16 variant halves the download).
DIFFUSERS_WEIGHT_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"],
}
# Which of our parts each subfolder holds.
PART_OF_FOLDER = {"unet": "unet", "vae": "vae", "text_encoder": "clip"}
# SD v1's text encoder activation (transformers' name); SD 2.x and others use "gelu".
CLIP_ACTIVATION = "quick_gelu"


def convert_diffusers(unet: dict, vae: dict, clip: dict) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers UNet/VAE and transformers CLIP state dicts -> this package's names."""
    return {"unet": {keys.diffusers_unet_key(k): v for k, v in unet.items()},
            "vae": {keys.diffusers_vae_key(k): v for k, v in vae.items()},
            "clip": {keys.transformers_clip_key(k): v for k, v in clip.items()}}


def read_diffusers_folder(folder: Path) -> Weights:
    """A diffusers folder -> our-named weights, the configs shapes cannot tell, and its tokenizer folder."""
    files, raw = {}, {}
    for sub, candidates in DIFFUSERS_WEIGHT_FILES.items():
        found = next((folder / sub / c for c in candidates if (folder / sub / c).is_file()), None)
        if found is None:
            raise ValueError(f"{folder} is not a diffusers SD folder: no weights in {sub}/ "
                             f"(expected one of {', '.join(candidates)})")
        part = PART_OF_FOLDER[sub]
        files[part], raw[part] = str(found), unwrap_state_dict(read_tensors(found)[0])
    with naming_the_file(files["unet"]):
        require_sd_v1({f"unet.{k}": v for k, v in raw["unet"].items()})
    unet, unet_keys = renamed(raw["unet"], keys.diffusers_unet_key)
    vae, vae_keys = renamed(raw["vae"], keys.diffusers_vae_key)
    clip, clip_keys = renamed(raw["clip"], keys.transformers_clip_key)
    clip_prefix = keys.CLIP_TEXT_MODEL if any(k.startswith(keys.CLIP_TEXT_MODEL) for k in raw["clip"]) else ""
    naming = KeyNaming(files=files, original={"unet": unet_keys, "vae": vae_keys, "clip": clip_keys},
                       back={"unet": keys.diffusers_file_key, "vae": keys.diffusers_file_key,
                             "clip": lambda k: keys.transformers_clip_file_key(k, clip_prefix)})
    tokenizer = folder / "tokenizer"
    return Weights({"unet": unet, "vae": vae, "clip": clip}, naming, diffusers_configs(folder),
                   tokenizer if tokenizer.is_dir() else None)


def diffusers_configs(folder: Path) -> dict:
    """What the folder's config.json files say that shapes cannot: head counts and the latent scale."""
    unet, vae, text = (_read_config(folder / sub / "config.json") for sub in ("unet", "vae", "text_encoder"))
    if text.get("hidden_act", CLIP_ACTIVATION) != CLIP_ACTIVATION:
        raise ValueError(f"{folder / 'text_encoder' / 'config.json'}: the text encoder uses {text['hidden_act']}, "
                         f"SD v1's CLIP uses {CLIP_ACTIVATION}: not an SD v1.x model")
    configs: dict = {"unet": {}, "vae": {}, "clip": {}}
    # diffusers' legacy name for the head count in SD v1 (`num_attention_heads = num_attention_heads or
    # attention_head_dim`, https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/unets/unet_2d_condition.py#L248-L254)
    heads = unet.get("attention_head_dim")
    if isinstance(heads, int):
        configs["unet"]["heads"] = heads
    if "norm_num_groups" in unet:
        configs["unet"]["norm_groups"] = unet["norm_num_groups"]
    if "scaling_factor" in vae:
        configs["vae"]["scaling_factor"] = vae["scaling_factor"]
    if "norm_num_groups" in vae:
        configs["vae"]["norm_groups"] = vae["norm_num_groups"]
    if "num_attention_heads" in text:
        configs["clip"]["heads"] = text["num_attention_heads"]
    return configs


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got a {type(config).__name__}")
    return config
