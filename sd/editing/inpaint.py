"""Inpainting with an ordinary SD v1.x checkpoint: repaint the white part of a mask, keep the black part.

Latent blending (Avrahami et al. 2023, "Blended Latent Diffusion", sec. 3; diffusers' legacy inpainting pipeline):
the sampler denoises the whole latent, and after every step the kept region is overwritten by the original
image's latents noised to the level of the next step. The repainted region is thus generated in a context
that is, at every noise level, the original picture. No special 9-channel inpainting UNet is needed.

Mask convention (diffusers'): white (>= 0.5) = repaint, black = keep; the mask has the image's size.
A latent pixel covers 8 x 8 pixels: it is repainted if any of its pixels is white (the mask is max-pooled),
so the kept region never loses a pixel the user wanted repainted. Documented edge cases:
an all-black mask (nothing to repaint) is an error; an all-white mask repaints everything (text to image).

The kept region's latents come out exactly as the original's; its pixels do not quite, because the VAE decoder
(GroupNorm statistics, mid-block attention) sees the whole latent. `keep_original_pixels=True` pastes the original
pixels back where the mask is black, as A1111 and diffusers' `apply_overlay` do.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import to_pil
from ..samplers import q_sample, randn
from .loop import denoise, require_edit_sampler

# A mask pixel at or above this value (in [0, 1]) is repainted (diffusers binarizes masks at 0.5 too).
MASK_THRESHOLD = 0.5


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W[, C]) array."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim >= 2:
        return int(image.shape[1]), int(image.shape[0])
    raise ValueError(f"expected a PIL image or an (H, W[, C]) array, got {type(image).__name__}")


def mask_to_tensor(mask, size: tuple[int, int], expected: tuple[int, int]) -> torch.Tensor:
    """A mask (PIL image, (H, W) array in [0, 1] or uint8) of the image's size -> (1, 1, H, W) of 0/1 at `size`."""
    if image_size(mask) != expected:
        raise ValueError(f"mask_image must have the init image's size {expected[0]}x{expected[1]} (width x height), "
                         f"got {image_size(mask)[0]}x{image_size(mask)[1]}")
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0           # (H, W) in [0, 1]
    else:
        arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)                                             # (H, W, C) -> (H, W)
        if arr.max() > 1.0:
            arr = arr / 255.0                                                   # uint8-style values
    binary = torch.from_numpy((arr >= MASK_THRESHOLD).astype(np.float32))[None, None]   # (1, 1, H, W)
    if binary.shape[-2:] != (size[1], size[0]):
        binary = F.interpolate(binary, size=(size[1], size[0]), mode="nearest")
    return binary


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(1, 1, H, W) pixel mask -> (1, 1, H/f, W/f): a latent pixel is repainted if any of its f x f pixels is."""
    return F.max_pool2d(mask, kernel_size=factor)


@torch.no_grad()
def inpaint(pipe, prompt: str | list[str], init_image, mask_image, negative_prompt: str | list[str] = "", *,
            height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
            guidance_scale: float = 7.5, sampler: str = "ddim", strength: float = 1.0, seed: int | None = None,
            num_images: int = 1, keep_original_pixels: bool = False, progress: bool = True, output_type: str = "pil"):
    """Repaint the white part of `mask_image` in `init_image` following the prompt.

    Returns PIL images; output_type="pt": (B, 3, H, W) in [0, 1]; "latent": the (B, 4, h, w) latents.
    """
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1] (1: the white region starts from pure noise), got {strength!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    generator = torch.Generator("cpu").manual_seed(random.randrange(2 ** 63) if seed is None else seed)

    # 1. the picture, its mask and their latents
    image = pipe.image_to_tensor(init_image, height, width).to(pipe.device)   # (1, 3, H, W) in [-1, 1]
    size = (image.shape[-1], image.shape[-2])
    mask = mask_to_tensor(mask_image, size, expected=image_size(init_image)).to(pipe.device)
    if mask.sum() == 0:
        raise ValueError("mask_image is all black: nothing to repaint (white = repaint, black = keep)")
    keep_latents_mask = 1 - latent_mask(mask, pipe.vae_factor).to(pipe.dtype)  # (1, 1, h, w): 1 = keep
    with pipe._on_device(pipe.encoder):
        encoder_dtype = next(pipe.encoder.parameters()).dtype
        original = pipe.encoder(image.to(encoder_dtype)).to(pipe.dtype)        # (1, 4, h, w), the posterior mean

    # 2. the text, then noise for every image of the batch
    context = pipe.encode_prompt(prompts).repeat_interleave(num_images, dim=0)   # (B, 77, D)
    uncond = pipe.encode_prompt(negatives).repeat_interleave(num_images, dim=0) if guidance_scale > 1 else None
    shape = (context.shape[0], *original.shape[1:])
    noise = randn(shape, generator, pipe.dtype, pipe.device)                  # (B, 4, h, w), one draw for all steps
    levels = pipe.scheduler.noise_levels(num_inference_steps, require_edit_sampler(sampler))
    alpha_bars = levels.alpha_bars.to(pipe.device)                           # (n + 1,): where step i starts, and ends
    first = num_inference_steps - max(1, int(num_inference_steps * strength))
    x = noise if first == 0 else q_sample(original.expand(shape), noise, alpha_bars[first])

    # 3. denoise, putting the kept region back at the next step's noise level after each step
    def blend(i: int, x: torch.Tensor) -> torch.Tensor:
        last = i + 1 == num_inference_steps
        known = original.expand(shape) if last else q_sample(original.expand(shape), noise, alpha_bars[i + 1])
        return keep_latents_mask * known + (1 - keep_latents_mask) * x

    with pipe._on_device(pipe.unet):
        latents = denoise(pipe.unet, levels, x, context, uncond, guidance_scale, first, generator, sampler,
                          after_step=blend, progress=progress)
    if output_type == "latent":
        return latents
    images = pipe.decode(latents)                                             # (B, 3, H, W) in [0, 1]
    if keep_original_pixels:
        images = mask * images + (1 - mask) * (image / 2 + 0.5).to(images)   # black = the original's pixels
    return images if output_type == "pt" else to_pil(images)
