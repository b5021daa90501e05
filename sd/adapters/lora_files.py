"""LoRA files for SD v1.x, as people download them: diffusers/PEFT and kohya (sd-scripts, A1111, Civitai) layouts.

The same adapted layer is spelled in three ways:
- diffusers/PEFT: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` (and lora_B);
  older diffusers files say `...to_q.lora.down.weight` / `lora.up`, `lora_linear_layer.down`, or
  `attn1.processor.to_q_lora.down.weight`; the alpha, if any, sits in the safetensors metadata
  `lora_adapter_metadata` (PEFT's `lora_alpha`, `alpha_pattern`);
- kohya: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.lora_up.weight`
  and `.alpha` (a scalar tensor); the text encoder is `lora_te_text_model_encoder_layers_0_self_attn_q_proj...`.
  The name is diffusers' module path with every "." written "_";
- this package's own files (`save_lora_weights`): `unet.down.0.attn.0.blocks.0.attn1.to_q.lora_A.weight`.
Each is brought to a diffusers/transformers module path, then renamed to this package's module by the checkpoint
rules (sd/io/keys.py), which leave this package's own names unchanged.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..io.keys import diffusers_unet_key, transformers_clip_key
from ..io.safe_read import SAFETENSORS_SUFFIX, read_tensors, save_safetensors
from ..validation import require_file, require_scale
from .lora import LoRALayer, innermost, inject_lora, lora_layers, replace_module

# diffusers' safetensors metadata entry with PEFT's LoraConfig of each model (diffusers/loaders/lora_base.py).
LORA_METADATA_KEY = "lora_adapter_metadata"
# The model prefixes of a diffusers LoRA file, and kohya's.
UNET, TEXT_ENCODER = "unet", "text_encoder"
KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT_ENCODER, "lora_te1_": TEXT_ENCODER}
# What only SDXL (or later) files hold: a second text encoder, the added-conditioning embedding.
OTHER_FAMILY_MARKS = ("lora_te2_", "text_encoder_2.", "add_embedding", "label_emb")
# Module names that contain "_": kohya's flattened names are made dotted again except inside these.
COMPOUND_NAMES = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                  "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
                  "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                  "input_blocks", "middle_block", "output_blocks")
# CompVis block names: kohya writes them for SDXL (its own sgm UNet); for SD v1.x it writes diffusers' names.
COMPVIS_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# diffusers' key endings -> which LoRA matrix (down = A, up = B), all layouts.
DIFFUSERS_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                   "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# The oldest diffusers UNet files: `attn1.processor.to_q_lora.down.weight` -> `attn1.to_q` + `lora.down.weight`.
OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
# ... and their text encoder: `self_attn.to_q_lora.down.weight` -> `self_attn.q_proj` + `lora.down.weight`.
OLD_TEXT_ATTENTION = re.compile(r"\.to_(q|k|v|out)_lora\.")


@dataclass
class LoRAWeights:
    """One adapted layer as a file stores it: A (down), B (up), and alpha (None: alpha = rank)."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def kohya_to_module_path(stem: str) -> str:
    """kohya's flat name -> diffusers' module path.

    `down_blocks_0_attentions_1_proj_in` -> `down_blocks.0.attentions.1.proj_in`: every "_" becomes ".", except
    inside the compound names of COMPOUND_NAMES.
    """
    path = stem.replace("_", ".")
    for name in COMPOUND_NAMES:
        path = re.sub(rf"(?<![^.]){re.escape(name.replace('_', '.'))}(?![^.])", name, path)
    return path


def _split_key(key: str, file: str) -> tuple[str, str, str]:
    """A file's key -> (model, diffusers/transformers module path, "down" | "up" | "alpha")."""
    if any(mark in key for mark in OTHER_FAMILY_MARKS):
        raise ValueError(f"{file}: key {key!r} belongs to an SDXL (or later) LoRA; this package loads SD v1.x LoRAs")
    for prefix, model in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            stem, _, ending = key[len(prefix):].partition(".")
            if ending not in KOHYA_ROLES:
                raise ValueError(f"{file}: key {key!r} is not a LoRA weight (expected .lora_down.weight, "
                                 f".lora_up.weight or .alpha; DoRA/LyCORIS variants are not supported)")
            return model, kohya_to_module_path(stem), KOHYA_ROLES[ending]
    model, _, rest = key.partition(".")
    if model not in (UNET, TEXT_ENCODER):
        if not key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            raise ValueError(f"{file}: key {key!r} is neither a diffusers (unet./text_encoder.) nor a kohya "
                             f"(lora_unet_/lora_te_) LoRA key")
        model, rest = UNET, key            # the oldest UNet-only files have no prefix
    if model == UNET:
        rest = OLD_PROCESSOR.sub(lambda m: f".{m.group(1)}{'.0' if m.group(1) == 'to_out' else ''}.lora.", rest)
    else:
        rest = OLD_TEXT_ATTENTION.sub(lambda m: f".{m.group(1)}_proj.lora.", rest)
    for ending, role in DIFFUSERS_ROLES.items():
        if rest.endswith(f".{ending}"):
            return model, rest[: -len(ending) - 1], role
    raise ValueError(f"{file}: key {key!r} is not a LoRA weight (expected .lora_A.weight, .lora_B.weight, "
                     f".lora.down.weight, .lora.up.weight or .alpha)")


def _metadata_alpha(metadata: dict, model: str, path: str, file: str) -> float | None:
    """PEFT's alpha for one module: its `alpha_pattern` entry (a regex on the module path's end), else `lora_alpha`."""
    for pattern, alpha in (metadata.get(f"{model}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return _finite_alpha(alpha, f"{file}: metadata {model}.alpha_pattern[{pattern!r}]")
    alpha = metadata.get(f"{model}.lora_alpha")
    return None if alpha is None else _finite_alpha(alpha, f"{file}: metadata {model}.lora_alpha")


def _finite_alpha(alpha, where: str) -> float:
    """A LoRA's alpha as a file stores it (a number, or a one-element tensor) -> a finite float; else one line."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"{where}: alpha must be one number, got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    try:
        return require_scale(alpha, "alpha")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}; refused before changing the model") from None


def _require_lora_matrix(value, where: str) -> torch.Tensor:
    """A LoRA matrix as a file stores it: a floating-point tensor of finite numbers; else one line naming the key."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{where}: a LoRA matrix must be a floating-point tensor, got {kind}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{where} holds NaN or infinite values; refused before changing the model "
                         f"(it would turn every image into NaN)")
    return value


def read_lora_file(path: str | Path) -> dict[str, dict[str, LoRAWeights]]:
    """A LoRA file -> {"unet": {module path: weights}, "text_encoder": {...}}, module paths in diffusers' names."""
    path = Path(path)
    tensors, _ = read_tensors(path)
    metadata = {}
    if path.suffix == SAFETENSORS_SUFFIX:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
    if not tensors:
        raise ValueError(f"{path.name} holds no tensors")
    found: dict[str, dict[str, LoRAWeights]] = {UNET: {}, TEXT_ENCODER: {}}
    for key, value in tensors.items():
        model, module_path, role = _split_key(key, path.name)
        weights = found[model].setdefault(module_path, LoRAWeights())
        if role == "alpha":
            weights.alpha = _finite_alpha(value, f"{path.name}, key {key!r}")
        else:
            setattr(weights, role, _require_lora_matrix(value, f"{path.name}, key {key!r}"))
    for model, modules in found.items():
        for module_path, weights in modules.items():
            if weights.down is None or weights.up is None:
                raise ValueError(f"{path.name}: the LoRA of {model}.{module_path} has no "
                                 f"{'down (A)' if weights.down is None else 'up (B)'} matrix")
            if weights.alpha is None:
                weights.alpha = _metadata_alpha(metadata, model, module_path, path.name)
    return found


def _our_module_name(model: str, module_path: str) -> str:
    """diffusers' / transformers' module path -> this package's, by the checkpoint rules of sd/io/keys.py."""
    rule = diffusers_unet_key if model == UNET else transformers_clip_key
    return rule(f"{module_path}.weight").removesuffix(".weight")


def _check_shapes(layer: nn.Module, w: LoRAWeights, where: str) -> int:
    """The rank of a LoRA whose matrices fit `layer`; else one line naming the key and the file."""
    if w.down.dim() < 2:
        raise ValueError(f"{where}: down (A) must be a matrix (rank x in), got shape {tuple(w.down.shape)}")
    rank = w.down.shape[0]
    if w.up.dim() < 2 or w.up.shape[1] != rank:
        raise ValueError(f"{where}: rank mismatch, down (A) has {rank} rows but up (B) has shape {tuple(w.up.shape)}")
    base = innermost(layer)
    if isinstance(base, nn.Linear):
        expected_down, expected_up = (rank, base.in_features), (base.out_features, rank)
    else:
        expected_down = (rank, base.in_channels, *base.kernel_size)
        expected_up = (base.out_channels, rank, 1, 1)
    if tuple(w.down.shape) != expected_down or tuple(w.up.shape) != expected_up:
        raise ValueError(f"{where}: shapes down {tuple(w.down.shape)} / up {tuple(w.up.shape)} do not fit the layer "
                         f"(expected {expected_down} / {expected_up}); a LoRA for another model family or size "
                         f"(SDXL's text is 2048 wide, SD 2's 1024)?")
    return rank


def load_lora_weights(pipe, path: str | Path, scale: float = 1.0) -> dict[str, int]:
    """Add the LoRA of a diffusers/PEFT or kohya file to pipe.unet and pipe.clip; returns the count per model.

    Everything is checked before the model changes (scale, every key, tensor, alpha and shape); a refused file
    leaves the pipeline exactly as it was.
    """
    scale = require_scale(scale, "scale")
    path = require_file(path, "path", "LoRA file")
    models = {UNET: pipe.unet, TEXT_ENCODER: pipe.clip}
    found = read_lora_file(path)
    planned = []
    for model, modules in found.items():       # 1. check everything first
        for module_path, w in modules.items():
            name = _our_module_name(model, module_path)
            where = f"{path.name}, key {model}.{module_path}"
            try:
                layer = models[model].get_submodule(name)
            except AttributeError:
                hint = " (CompVis block names, as in SDXL files: SD v1.x LoRAs use diffusers' names)" \
                    if module_path.startswith(COMPVIS_BLOCKS) else ""
                raise ValueError(f"{where}: matches no layer of the {model} (looked for {name!r}){hint}") from None
            if not isinstance(innermost(layer), (nn.Linear, nn.Conv2d)):
                raise ValueError(f"{where}: {name!r} is a {type(layer).__name__}, not a Linear or Conv2d layer")
            planned.append((model, name, w, _check_shapes(layer, w, where)))
    added = []                                 # 2. then apply; should anything still fail, undo what was added
    try:
        for model, name, w, rank in planned:
            layer = inject_lora(models[model], name, rank, w.alpha, scale)
            added.append((models[model], name, layer))
            with torch.no_grad():
                layer.lora_A.weight.copy_(w.down)
                layer.lora_B.weight.copy_(w.up)
            layer.requires_grad_(False)
    except BaseException:
        for module, name, layer in reversed(added):
            replace_module(module, name, layer.base)
        raise
    return {model: len(modules) for model, modules in found.items()}



def lora_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's LoRAs in this package's names: `unet.<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`."""
    out = {}
    for model, module in ((UNET, pipe.unet), (TEXT_ENCODER, pipe.clip)):
        for name, layer in lora_layers(module).items():
            if isinstance(layer.base, LoRALayer):
                raise ValueError(f"{model}.{name} holds stacked LoRAs; fuse or unload all but one before saving")
            out[f"{model}.{name}.lora_A.weight"] = layer.lora_A.weight
            out[f"{model}.{name}.lora_B.weight"] = layer.lora_B.weight
            out[f"{model}.{name}.alpha"] = torch.tensor(layer.alpha)
    return out


def save_lora_weights(pipe, path: str | Path) -> Path:
    """Write the pipeline's LoRAs to a .safetensors file that `load_lora_weights` reads back."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"LoRA weights are saved as {SAFETENSORS_SUFFIX}, got {path.name}")
    tensors = lora_state_dict(pipe)
    if not tensors:
        raise ValueError("the pipeline has no LoRA to save (add one with sd.adapters.lora.add_lora)")
    save_safetensors(tensors, path, {})
    return path
