"""Reference models from diffusers/transformers, built offline from config dicts, and weight copying into `sd`."""
from __future__ import annotations

import torch

import sd
from sd.io.checkpoint import build_models
from sd.io.diffusers import convert_diffusers


def diffusers_unet(cfg: sd.UNetConfig):
    from diffusers import UNet2DConditionModel
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.block_channels,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_groups,
        flip_sin_to_cos=True, freq_shift=0).eval()


def diffusers_vae(cfg: sd.VAEConfig):
    from diffusers import AutoencoderKL
    n = len(cfg.block_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups, scaling_factor=0.18215).eval()


def transformers_clip(cfg: sd.CLIPConfig):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_tokens,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=49407, bos_token_id=49406,
        eos_token_id=49407)).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (norm weights and biases too), so no default init hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(noise + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    return module


def reference_and_ours(unet_cfg=None, vae_cfg=None, clip_cfg=None, seed=0):
    """Random diffusers/transformers models and `sd` models holding the very same weights."""
    unet_cfg, vae_cfg, clip_cfg = unet_cfg or sd.UNetConfig.tiny(), vae_cfg or sd.VAEConfig.tiny(), clip_cfg or sd.CLIPConfig.tiny()
    ref = {"unet": randomize(diffusers_unet(unet_cfg), seed), "vae": randomize(diffusers_vae(vae_cfg), seed + 1),
           "clip": randomize(transformers_clip(clip_cfg), seed + 2)}
    parts = convert_diffusers(ref["unet"].state_dict(), ref["vae"].state_dict(), ref["clip"].state_dict())
    ours = build_models(parts, {"unet": {"heads": unet_cfg.heads}, "clip": {"heads": clip_cfg.heads}})
    return ref, {k: v.eval() for k, v in ours.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (its max abs value)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def diffusers_from_single_file(ckpt: dict, unet_cfg, vae_cfg, clip_cfg) -> dict:
    """diffusers' own conversion of a CompVis state dict, loaded strictly into fresh diffusers models."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    unet, vae, clip = diffusers_unet(unet_cfg), diffusers_vae(vae_cfg), transformers_clip(clip_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), strict=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), strict=True)
    clip_state = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()
                  if not k.endswith("position_ids")}
    clip.load_state_dict(clip_state, strict=True)
    return {"unet": unet.eval(), "vae": vae.eval(), "clip": clip.eval()}
