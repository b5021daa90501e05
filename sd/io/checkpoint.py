"""`load_checkpoint`: SD v1.x weights from a single file, a diffusers folder or a state dict, into this package.

Model widths are read off the tensor shapes, so any checkpoint with SD v1's layout loads, full size or scaled down.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from . import keys
from . import hub
from .safe_read import read_tensors, unwrap_state_dict
from ..clip import CLIP
from ..config import CLIPConfig, UNetConfig, VAEConfig
from ..decoder import VAE_Decoder
from ..encoder import VAE_Encoder
from ..unet import DiffusionUNET
from ..runtime.device import resolve_device

# Entries of a CompVis file that are not model weights: the noise schedule and training state.
IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus",
                    "posterior_", "lvlb_weights", "logvar", "first_stage_model.loss.")
# CLIP's attention heads are 64 wide (ViT-L/14: 768 / 12), used when a file does not say how many heads.
CLIP_HEAD_WIDTH = 64
# SD v1.5's UNet: 8 heads everywhere, whatever the width.
UNET_HEADS = 8


def _prefix_count(state: dict, pattern: str) -> int:
    """How many distinct values the (\\d+) in `pattern` takes among the keys."""
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _shape(state: dict, key: str, what: str) -> torch.Size:
    if key not in state:
        raise ValueError(f"checkpoint is missing `{key}` ({what}); is this an SD v1.x checkpoint?")
    return state[key].shape


# --- what model family is this? ------------------------------------------------------------------------------------

def check_family(raw: dict) -> None:
    """Raise a clear error for checkpoints of other model families (SD 2.x, SDXL, ...)."""
    names = list(raw)
    if any(k.startswith("conditioner.embedders.") for k in names) or any(".label_emb." in k for k in names):
        raise ValueError("this looks like an SDXL checkpoint (`conditioner.embedders.*`, `label_emb`): "
                         "only SD v1.x is supported")
    if any(k.startswith("cond_stage_model.model.") for k in names):
        raise ValueError("this looks like an SD 2.x checkpoint (OpenCLIP text encoder `cond_stage_model.model.*`): "
                         "only SD v1.x is supported")
    for k, v in raw.items():
        if k.endswith("attn2.to_k.weight") and v.shape[1] == 1024:
            raise ValueError(f"this looks like an SD 2.x checkpoint (`{k}` takes 1024-wide text embeddings; "
                             "SD v1 uses 768): only SD v1.x is supported")
        if k.endswith(".proj_in.weight") and v.dim() == 2:
            raise ValueError(f"this looks like an SD 2.x checkpoint (`{k}` is a Linear layer; SD v1 uses 1x1 "
                             "convolutions): only SD v1.x is supported")


# --- configs from shapes (our key names) ---------------------------------------------------------------------------

def infer_unet_config(s: dict, given: dict | None = None) -> UNetConfig:
    levels = _prefix_count(s, r"^down\.(\d+)\.res\.0\.conv1\.weight$")
    if levels == 0:
        _shape(s, "down.0.res.0.conv1.weight", "the UNet's first residual block")
    ctx_key = next((k for k in s if k.endswith("attn2.to_k.weight")), None)
    cfg = dict(
        in_channels=_shape(s, "conv_in.weight", "UNet input conv")[1],
        out_channels=_shape(s, "conv_out.weight", "UNet output conv")[0],
        block_channels=tuple(_shape(s, f"down.{i}.res.0.conv1.weight", "UNet level")[0] for i in range(levels)),
        layers_per_block=_prefix_count(s, r"^down\.0\.res\.(\d+)\.conv1\.weight$"),
        attention_levels=tuple(f"down.{i}.attn.0.proj_in.weight" in s for i in range(levels)),
        context_dim=s[ctx_key].shape[1] if ctx_key else UNetConfig().context_dim,
        transformer_depth=max(1, _prefix_count(s, r"^mid\.attn\.blocks\.(\d+)\.norm1\.weight$")),
        heads=UNET_HEADS,
    )
    return UNetConfig.from_dict({**cfg, **(given or {})})


def infer_vae_config(s: dict, given: dict | None = None) -> VAEConfig:
    levels = _prefix_count(s, r"^encoder\.down\.(\d+)\.res\.0\.conv1\.weight$")
    if levels == 0:
        _shape(s, "encoder.down.0.res.0.conv1.weight", "the VAE encoder's first residual block")
    cfg = dict(
        in_channels=_shape(s, "encoder.conv_in.weight", "VAE encoder input conv")[1],
        latent_channels=_shape(s, "decoder.conv_in.weight", "VAE decoder input conv")[1],
        block_channels=tuple(_shape(s, f"encoder.down.{i}.res.0.conv1.weight", "VAE level")[0] for i in range(levels)),
        layers_per_block=_prefix_count(s, r"^encoder\.down\.0\.res\.(\d+)\.conv1\.weight$"),
    )
    return VAEConfig.from_dict({**cfg, **(given or {})})


def infer_clip_config(s: dict, given: dict | None = None) -> CLIPConfig:
    vocab, width = _shape(s, "embedding.token_embedding.weight", "CLIP token embedding")
    cfg = dict(
        vocab_size=vocab, width=width,
        max_tokens=_shape(s, "embedding.position_embedding.weight", "CLIP position embedding")[0],
        layers=_prefix_count(s, r"^layers\.(\d+)\.layer_norm1\.weight$"),
        heads=max(1, width // CLIP_HEAD_WIDTH),
        mlp_width=_shape(s, "layers.0.mlp.fc1.weight", "CLIP MLP")[0],
    )
    return CLIPConfig.from_dict({**cfg, **(given or {})})


# --- converting whole state dicts to our names -----------------------------------------------------------------------

def split_compvis(raw: dict) -> dict[str, dict[str, torch.Tensor]]:
    """A CompVis single-file state dict -> {'unet', 'vae', 'clip'} state dicts with this package's names."""
    unet_raw, vae_raw, clip_raw, unknown = {}, {}, {}, []
    for k, v in raw.items():
        if k.startswith(keys.COMPVIS_UNET):
            unet_raw[k[len(keys.COMPVIS_UNET):]] = v
        elif k.startswith(keys.COMPVIS_VAE) and not k.startswith(keys.COMPVIS_VAE + "loss."):
            vae_raw[k[len(keys.COMPVIS_VAE):]] = v
        elif k.startswith(keys.COMPVIS_CLIP):
            clip_raw[k[len(keys.COMPVIS_CLIP):]] = v
        elif not k.startswith(IGNORED_PREFIXES):
            unknown.append(k)
    if unknown:
        raise ValueError(f"unexpected entries in the checkpoint: {_names(unknown)} "
                         "(expected model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)")
    # The UNet's CompVis numbering depends on blocks per level and where attention sits: read both off the keys.
    ops = sorted(int(m.group(1)) for k in unet_raw if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.weight$", k)))
    layers_per_block = ops[0] - 1 if ops else UNetConfig().layers_per_block
    levels = len(ops) + 1
    attn = tuple(f"input_blocks.{1 + i * (layers_per_block + 1)}.1.proj_in.weight" in unet_raw for i in range(levels))
    vae_levels = _prefix_count(vae_raw, r"^encoder\.down\.(\d+)\.")
    unet = {keys.compvis_unet_key(k, layers_per_block, attn): v for k, v in unet_raw.items()}
    vae = {keys.compvis_vae_key(k, vae_levels): _conv1x1_to_linear(k, v) for k, v in vae_raw.items()}
    clip = {keys.transformers_clip_key(k): v for k, v in clip_raw.items()}
    return {"unet": unet, "vae": vae, "clip": clip}


def _conv1x1_to_linear(key: str, v: torch.Tensor) -> torch.Tensor:
    """The CompVis VAE attention stores q/k/v/proj_out as [C, C, 1, 1] conv weights; ours are [C, C] Linear."""
    if ".attn_1." in key and key.endswith("weight") and v.dim() == 4:
        return v[:, :, 0, 0]
    return v


def convert_diffusers(unet: dict, vae: dict, clip: dict) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers UNet/VAE and transformers CLIP state dicts -> this package's names."""
    return {"unet": {keys.diffusers_unet_key(k): v for k, v in unet.items()},
            "vae": {keys.diffusers_vae_key(k): v for k, v in vae.items()},
            "clip": {keys.transformers_clip_key(k): v for k, v in clip.items()}}


# --- building models -----------------------------------------------------------------------------------------------

def load_into(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> nn.Module:
    """Copy weights with strict checking; name what is missing or unexpected, in one line."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}   # regenerated, never trusted
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise ValueError(f"{name} weights do not fit SD v1.x's layout: " + "; ".join(parts))
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{name} weight `{k}` has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(f"`{n}`" for n in names[:shown]) + more


def build_models(parts: dict[str, dict[str, torch.Tensor]], configs: dict | None = None) -> dict[str, nn.Module]:
    """Our-named state dicts -> CLIP, VAE encoder/decoder and UNet with the weights loaded."""
    configs = configs or {}
    unet_cfg = infer_unet_config(parts["unet"], configs.get("unet"))
    if unet_cfg.in_channels != unet_cfg.out_channels:
        raise ValueError(f"the UNet takes {unet_cfg.in_channels} input channels (an inpainting or depth model?): "
                         "only SD v1.x text-to-image checkpoints are supported")
    vae_cfg = infer_vae_config(parts["vae"], configs.get("vae"))
    clip_cfg = infer_clip_config(parts["clip"], configs.get("clip"))
    vae = parts["vae"]
    enc_state = {k[len("encoder."):]: v for k, v in vae.items() if k.startswith("encoder.")}
    enc_state.update({k: v for k, v in vae.items() if k.startswith("quant_conv.")})
    dec_state = {k[len("decoder."):]: v for k, v in vae.items() if k.startswith("decoder.")}
    dec_state.update({k: v for k, v in vae.items() if k.startswith("post_quant_conv.")})
    stray = [k for k in vae if not k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    if stray:
        raise ValueError(f"VAE weights do not fit SD v1.x's layout: unexpected {_names(stray)}")
    return {
        "clip": load_into(CLIP(clip_cfg), parts["clip"], "CLIP"),
        "encoder": load_into(VAE_Encoder(vae_cfg), enc_state, "VAE encoder"),
        "decoder": load_into(VAE_Decoder(vae_cfg), dec_state, "VAE decoder"),
        "unet": load_into(DiffusionUNET(unet_cfg), parts["unet"], "UNet"),
    }


def read_source(source) -> tuple[dict[str, dict[str, torch.Tensor]], dict, Path | None]:
    """A file, a diffusers folder or an in-memory state dict -> (our-named parts, configs, tokenizer folder or None)."""
    if isinstance(source, dict):
        raw, configs, tok = unwrap_state_dict(source), {}, None
        check_family(raw)
        return split_compvis(raw), configs, tok
    path = Path(source)
    if path.is_dir():
        return _read_diffusers_folder(path)
    raw, configs = read_tensors(path)
    raw = unwrap_state_dict(raw)
    check_family(raw)
    if any(k.startswith(("unet.", "vae.", "clip.")) for k in raw):
        # this package's own format: one file, `unet.*`, `vae.*`, `clip.*` in our names
        parts = {name: {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}
                 for name in ("unet", "vae", "clip")}
        tok = path.parent / (path.stem + "_tokenizer")
        return parts, configs, tok if tok.is_dir() else None
    return split_compvis(raw), configs, None


# Weight files inside a diffusers folder, in order of preference (the fp16 variant halves the download).
DIFFUSERS_WEIGHT_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"],
}


def _read_diffusers_folder(folder: Path):
    weights = {}
    for sub, candidates in DIFFUSERS_WEIGHT_FILES.items():
        found = next((folder / sub / c for c in candidates if (folder / sub / c).is_file()), None)
        if found is None:
            raise ValueError(f"{folder} is not a diffusers SD folder: no weights in {sub}/ "
                             f"(expected one of {', '.join(candidates)})")
        weights[sub] = unwrap_state_dict(read_tensors(found)[0])
    configs = _diffusers_configs(folder)
    check_family({f"unet.{k}": v for k, v in weights["unet"].items()})
    parts = convert_diffusers(weights["unet"], weights["vae"], weights["text_encoder"])
    tok = folder / "tokenizer"
    return parts, configs, tok if tok.is_dir() else None


def _diffusers_configs(folder: Path) -> dict:
    """What the folder's config.json files say that shapes cannot: head counts and the latent scale."""
    def read(sub):
        p = folder / sub / "config.json"
        return json.loads(p.read_text()) if p.is_file() else {}
    unet, vae, text = read("unet"), read("vae"), read("text_encoder")
    if text.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"text encoder uses {text['hidden_act']}, SD v1's CLIP uses quick_gelu: not an SD v1.x model")
    configs: dict = {"unet": {}, "vae": {}, "clip": {}}
    heads = unet.get("attention_head_dim")   # diffusers' legacy name for the head count in SD v1
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


# --- the public entry point ----------------------------------------------------------------------------------------

def load_checkpoint(source=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load SD v1.x weights into this package: a .safetensors/.ckpt file, a diffusers folder, a Hugging Face Hub
    id ("stable-diffusion-v1-5/stable-diffusion-v1-5", downloaded once into the Hub cache) or a state dict.
    No source: the project's own small model, trained on shapes.

    device: default CUDA when available, else CPU. dtype: default float16 on CUDA, float32 on CPU.
    """
    from ..pipeline import StableDiffusion
    from ..tokenizer import CLIPTokenizer
    if source is None:
        if not DEFAULT_MODEL.is_file():
            raise ValueError(NO_CHECKPOINT_HELP)
        source = DEFAULT_MODEL
    device = resolve_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if hub.looks_like_repo_id(source):
        source = hub.fetch(source, fp16=dtype != torch.float32)   # half-size files for float16 and bfloat16
    parts, configs, tokenizer_dir = read_source(source)
    models = build_models(parts, configs)
    for name, m in models.items():
        # the VAE stays in float32: SD v1.5's fp16 VAE can overflow into black/NaN images
        m.to(device=device, dtype=torch.float32 if name in ("encoder", "decoder") else dtype)
        m.eval().requires_grad_(False)
    return StableDiffusion(**models, tokenizer=CLIPTokenizer(tokenizer_dir), device=device, dtype=dtype)


# The project's own small model, trained on the shapes dataset (`python -m sd train all`), shipped in the package.
DEFAULT_MODEL = Path(__file__).parent.parent / "assets" / "default_model.safetensors"


def save_checkpoint(path: str | Path, clip: nn.Module, encoder: nn.Module, decoder: nn.Module, unet: nn.Module,
                    tokenizer=None) -> Path:
    """Save the four models in this package's own format: one safetensors file, configs in its metadata.

    Keys are `clip.*`, `vae.encoder.*` / `vae.decoder.*` (plus `vae.quant_conv`, `vae.post_quant_conv`), `unet.*`;
    a tokenizer, if given, goes to the folder `<name>_tokenizer/` beside the file.
    """
    from .safe_read import save_safetensors
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    for k, v in encoder.state_dict().items():
        tensors[f"vae.{k}" if k.startswith("quant_conv.") else f"vae.encoder.{k}"] = v
    for k, v in decoder.state_dict().items():
        tensors[f"vae.{k}" if k.startswith("post_quant_conv.") else f"vae.decoder.{k}"] = v
    configs = {"clip": clip.config.to_dict(), "vae": encoder.config.to_dict(), "unet": unet.config.to_dict()}
    save_safetensors(tensors, path, configs)
    if tokenizer is not None:
        tokenizer.save(path.parent / (path.stem + "_tokenizer"))
    return path


NO_CHECKPOINT_HELP = (
    "no checkpoint given and the project's default model is not installed: pass SD v1.5 weights "
    "(--checkpoint v1-5-pruned-emaonly.safetensors, or sd.load_checkpoint(path)), a .safetensors/.ckpt file or a "
    "diffusers folder, downloaded from https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5")
