"""`load_checkpoint` and `save_checkpoint`: SD v1.x weights in and out of this package, and building the models.

Sources: a CompVis single file (`compvis.py`), a diffusers folder (`diffusers.py`), this package's own file
(one safetensors file, `unet.*`, `vae.*`, `clip.*` in our names, configs in its metadata, the tokenizer in a folder
beside it), a Hugging Face Hub id (`hub.py`) or a state dict in memory. Model widths are read off the tensor shapes
(`infer.py`), so any checkpoint with SD v1's layout loads, full size or scaled down.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import hub
from .compvis import split_compvis
from .diffusers import read_diffusers_folder
from .family import require_sd_v1, require_text_to_image
from .infer import MissingWeight, infer_clip_config, infer_unet_config, infer_vae_config
from .safe_read import TOKENIZER_METADATA_KEY, read_tensors, save_safetensors, stored_configs, unwrap_state_dict
from .weights import IN_MEMORY, OWN_PARTS, PARTS, TRANSFORMER, KeyNaming, Weights, key_list, naming_the_file
from ..clip import CLIP
from ..decoder import VAE_Decoder
from ..config import MMDiTConfig
from ..encoder import VAE_Encoder
from ..mmdit import MMDiT
from ..pipeline import StableDiffusion
from ..tokenizer import CLIPTokenizer
from ..unet import DiffusionUNET
from ..runtime.device import resolve_device

# The project's own small model, trained on the shapes dataset (`python -m sd train all`), shipped in the package.
DEFAULT_MODEL = Path(__file__).parent.parent / "assets" / "default_model.safetensors"
# The project's small transformer (SD3's MMDiT in miniature) on the same VAE and text encoder: `python -m sd train
# mmdit`; `sd.load_checkpoint(TRANSFORMER_MODEL)` or `python -m sd generate ... --checkpoint <this file>`.
TRANSFORMER_MODEL = DEFAULT_MODEL.parent / "shapes_transformer.safetensors"
NO_CHECKPOINT_HELP = (
    "no checkpoint given and the project's default model is not installed: pass SD v1.5 weights "
    "(--checkpoint v1-5-pruned-emaonly.safetensors, or sd.load_checkpoint(path)), a .safetensors/.ckpt file or a "
    "diffusers folder, downloaded from https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5")
# The VAE's parts outside its encoder and decoder, and which of the two each belongs to.
ENCODER_EXTRA, DECODER_EXTRA = "quant_conv.", "post_quant_conv."


# --- building models -----------------------------------------------------------------------------------------------

def load_into(model: nn.Module, state: dict[str, torch.Tensor], label: str, file: str, file_key) -> nn.Module:
    """Copy weights with strict checking; name what is missing or unexpected in the file's own layout, one line."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}   # regenerated, never trusted
    expected = model.state_dict()
    missing = [file_key(k) for k in expected if k not in state]
    unexpected = [file_key(k) for k in state if k not in expected]
    if missing or unexpected:
        found = ([f"missing {key_list(missing)}"] if missing else []) + \
                ([f"unexpected {key_list(unexpected)}"] if unexpected else [])
        raise ValueError(f"{file}: {label} weights do not fit SD v1.x's layout: " + "; ".join(found))
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{file}: {label} weight `{file_key(k)}` has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model


def _config(part: str, infer, parts: dict, configs: dict, naming: KeyNaming):
    """A part's config read off its shapes and what the file says, with errors that name the file."""
    try:
        return infer(parts[part], configs.get(part))
    except MissingWeight as e:
        raise ValueError(f"{naming.file(part)}: missing `{naming.file_key(part, e.key)}` ({e.what}); "
                         "is this an SD v1.x checkpoint?") from None
    except (TypeError, ValueError) as e:
        raise type(e)(f"{naming.file(part)}: {e}") from None


def build_denoiser(parts: dict[str, dict[str, torch.Tensor]], configs: dict, naming: KeyNaming) -> nn.Module:
    """The UNet, or, in this package's own files, the transformer that takes its place; weights loaded."""
    if parts.get(TRANSFORMER):
        where = naming.file(TRANSFORMER)
        if TRANSFORMER not in configs:
            raise ValueError(f"{where}: it holds `{TRANSFORMER}.*` weights but no transformer config in its metadata; "
                             "save the model with sd.save_checkpoint")
        with naming_the_file(where):
            config = MMDiTConfig.from_dict(configs[TRANSFORMER])
        if parts.get("unet"):
            raise ValueError(f"{where}: it holds both a UNet and a transformer; a model has one denoiser")
        return load_into(MMDiT(config), parts[TRANSFORMER], "transformer", where,
                         lambda k: f"{TRANSFORMER}.{k}")
    unet_cfg = _config("unet", infer_unet_config, parts, configs, naming)
    with naming_the_file(naming.file("unet")):
        require_text_to_image(unet_cfg.in_channels, unet_cfg.out_channels)
    return load_into(DiffusionUNET(unet_cfg), parts["unet"], "UNet", naming.file("unet"),
                     lambda k: naming.file_key("unet", k))


def build_models(parts: dict[str, dict[str, torch.Tensor]], configs: dict | None = None,
                 naming: KeyNaming | None = None) -> dict[str, nn.Module]:
    """Our-named state dicts -> CLIP, VAE encoder/decoder and UNet (or transformer) with the weights loaded."""
    configs, naming = configs or {}, naming or KeyNaming()
    unet = build_denoiser(parts, configs, naming)
    vae_cfg = _config("vae", infer_vae_config, parts, configs, naming)
    clip_cfg = _config("clip", infer_clip_config, parts, configs, naming)
    vae = parts["vae"]
    enc_state = {k.removeprefix("encoder."): v for k, v in vae.items() if k.startswith(("encoder.", ENCODER_EXTRA))}
    dec_state = {k.removeprefix("decoder."): v for k, v in vae.items() if k.startswith(("decoder.", DECODER_EXTRA))}
    stray = [naming.file_key("vae", k) for k in vae if not k.startswith(("encoder.", "decoder.", ENCODER_EXTRA,
                                                                         DECODER_EXTRA))]
    if stray:
        raise ValueError(f"{naming.file('vae')}: VAE weights do not fit SD v1.x's layout: unexpected {key_list(stray)}")

    def vae_key(half: str, extra: str):
        return lambda k: naming.file_key("vae", k if k.startswith(extra) else f"{half}.{k}")

    return {
        "clip": load_into(CLIP(clip_cfg), parts["clip"], "CLIP", naming.file("clip"),
                          lambda k: naming.file_key("clip", k)),
        "encoder": load_into(VAE_Encoder(vae_cfg), enc_state, "VAE encoder", naming.file("vae"),
                             vae_key("encoder", ENCODER_EXTRA)),
        "decoder": load_into(VAE_Decoder(vae_cfg), dec_state, "VAE decoder", naming.file("vae"),
                             vae_key("decoder", DECODER_EXTRA)),
        "unet": unet,
    }


# --- reading any source --------------------------------------------------------------------------------------------

def tokenizer_folder(path: Path) -> Path:
    """Where `save_checkpoint` puts a model's tokenizer: `<name>_tokenizer/` beside `<name>.safetensors`."""
    return path.parent / (path.stem + "_tokenizer")


def read_source(source) -> Weights:
    """A file, a diffusers folder or an in-memory state dict -> our-named weights, ready for `build_models`."""
    if isinstance(source, dict):
        raw = unwrap_state_dict(source)
        with naming_the_file(IN_MEMORY):
            require_sd_v1(raw)
            return split_compvis(raw, IN_MEMORY)
    path = Path(source)
    if path.is_dir():
        return read_diffusers_folder(path)
    raw, metadata = read_tensors(path)
    raw = unwrap_state_dict(raw)
    with naming_the_file(path):
        require_sd_v1(raw)
        if not any(k.startswith(tuple(p + "." for p in OWN_PARTS)) for k in raw):
            return split_compvis(raw, str(path))
    return _read_own_format(path, raw, metadata)


def _read_own_format(path: Path, raw: dict[str, torch.Tensor], metadata: dict[str, str]) -> Weights:
    """This package's own file: `unet.*`, `vae.*`, `clip.*` in our names; configs and tokenizer folder in metadata."""
    parts = {p: {k[len(p) + 1:]: v for k, v in raw.items() if k.startswith(p + ".")} for p in OWN_PARTS}
    naming = KeyNaming(files=dict.fromkeys(OWN_PARTS, str(path)))   # the file's keys are ours, with the part in front
    tokenizer = tokenizer_folder(path)
    saved_as = metadata.get(TOKENIZER_METADATA_KEY)   # the folder's name when the file was saved
    if saved_as is not None and not tokenizer.is_dir():
        note = f", saved as {saved_as}/" if saved_as != tokenizer.name else ""
        raise ValueError(f"{path}: its tokenizer folder {tokenizer.name}/ is not beside it (save_checkpoint wrote "
                         f"one{note}); copy the folder along with the file")
    return Weights(parts, naming, stored_configs(metadata, path), tokenizer if tokenizer.is_dir() else None)


def require_tokenizer_fits(tokenizer: CLIPTokenizer, tokenizer_dir: Path | None, clip: CLIP, where: str) -> None:
    """Token ids beyond the text encoder's embedding table would fail at the first prompt: fail at load instead."""
    if tokenizer.vocab_size <= clip.config.vocab_size:
        return
    used = f"its tokenizer {tokenizer_dir}" if tokenizer_dir else "CLIP's standard tokenizer (none came with the model)"
    raise ValueError(f"{where}: its text encoder knows {clip.config.vocab_size} token ids, and {used} has "
                     f"{tokenizer.vocab_size}; a model saved with sd.save_checkpoint keeps its own tokenizer in the "
                     "folder <name>_tokenizer/ beside the file: copy that folder along with it")


# --- the public entry points ---------------------------------------------------------------------------------------

def load_checkpoint(source=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load SD v1.x weights into this package: a .safetensors/.ckpt file, a diffusers folder, a Hugging Face Hub
    id ("stable-diffusion-v1-5/stable-diffusion-v1-5", downloaded once into the Hub cache) or a state dict.
    No source: the project's own small model, trained on shapes.

    device: default CUDA when available, else Apple's MPS, else CPU. dtype: default float16 on CUDA and MPS, float32 on CPU.
    """
    if source is None:
        if not DEFAULT_MODEL.is_file():
            raise ValueError(NO_CHECKPOINT_HELP)
        source = DEFAULT_MODEL
    device = resolve_device(device)
    dtype = dtype or (torch.float16 if device.type in ("cuda", "mps") else torch.float32)
    if hub.looks_like_repo_id(source):
        source = hub.fetch(source, fp16=dtype != torch.float32)   # half-size files for float16 and bfloat16
    weights = read_source(source)
    models = build_models(weights.parts, weights.configs, weights.naming)
    tokenizer = CLIPTokenizer(weights.tokenizer_dir)
    require_tokenizer_fits(tokenizer, weights.tokenizer_dir, models["clip"], weights.naming.file("clip"))
    for name, m in models.items():
        # the VAE stays in float32: SD v1.5's fp16 VAE can overflow into black/NaN images
        m.to(device=device, dtype=torch.float32 if name in ("encoder", "decoder") else dtype)
        m.eval().requires_grad_(False)
    return StableDiffusion(**models, tokenizer=tokenizer, device=device, dtype=dtype)


def save_checkpoint(path: str | Path, clip: nn.Module, encoder: nn.Module, decoder: nn.Module, unet: nn.Module,
                    tokenizer=None) -> Path:
    """Save the four models in this package's own format: one safetensors file, configs in its metadata.

    Keys are `clip.*`, `vae.encoder.*` / `vae.decoder.*` (plus `vae.quant_conv`, `vae.post_quant_conv`), `unet.*`
    (or `transformer.*` when `unet` is the transformer of sd/mmdit.py);
    a tokenizer, if given, goes to the folder `<name>_tokenizer/` beside the file, and the file records its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    denoiser = TRANSFORMER if isinstance(unet, MMDiT) else "unet"
    tensors.update({f"{denoiser}.{k}": v for k, v in unet.state_dict().items()})
    for k, v in encoder.state_dict().items():
        tensors[f"vae.{k}" if k.startswith(ENCODER_EXTRA) else f"vae.encoder.{k}"] = v
    for k, v in decoder.state_dict().items():
        tensors[f"vae.{k}" if k.startswith(DECODER_EXTRA) else f"vae.decoder.{k}"] = v
    configs = {"clip": clip.config.to_dict(), "vae": encoder.config.to_dict(), denoiser: unet.config.to_dict()}
    folder = tokenizer_folder(path) if tokenizer is not None else None
    if folder is not None:
        tokenizer.save(folder)
    save_safetensors(tensors, path, configs, folder.name if folder is not None else None)
    return path
