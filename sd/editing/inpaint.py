"""Inpainting with an ordinary SD v1.x checkpoint: repaint the white part of a mask, keep the black part.

Latent blending (Avrahami et al. 2023, "Blended Latent Diffusion", sec. 3; diffusers' legacy inpainting pipeline):
the sampler denoises the whole latent, and after every step the kept region is overwritten by the original
image's latents noised to the level of the next step. The repainted region is thus generated in a context
that is, at every noise level, the original picture. No special 9-channel inpainting UNet is needed.

Mask convention (diffusers'): white (>= 0.5) = repaint, black = keep; the mask has the image's size and follows
the picture rules of sd/images.py (PIL; (H, W), (H, W, 1) or equal-channel (H, W, 3) arrays; uint8, float in
[0, 1] or bool), so that a [-1, 1] or 0..255-as-float mask is refused instead of misread.
A latent pixel covers 8 x 8 pixels: it is repainted if any of its pixels is white (the mask is max-pooled),
so the kept region never loses a pixel the user wanted repainted. Documented edge cases:
an all-black mask (nothing to repaint) is an error; an all-white mask repaints everything (text to image).

The kept region's latents come out exactly as the original's; its pixels do not quite, because the VAE decoder
(GroupNorm statistics, mid-block attention) sees the whole latent. `keep_original_pixels=True` pastes the original
pixels back where the mask is black, as A1111 and diffusers' `apply_overlay` do.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..images import as_mask_image, as_rgb_image, to_pil
from ..samplers import q_sample, randn
from ..validation import (MAX_BYTE, require_choice, require_flag, require_int, require_prompts, require_scale,
                          require_steps, require_strength)
from .loop import denoise, require_edit_sampler, seeded_generator

# A mask pixel at or above this value (in [0, 1]) is repainted (diffusers binarizes masks at 0.5 too).
MASK_THRESHOLD = 0.5
OUTPUT_TYPES = ("pil", "pt", "latent")


def mask_to_tensor(mask, size: tuple[int, int], expected: tuple[int, int]) -> torch.Tensor:
    """A mask (the picture conventions of sd/images.py: PIL image; (H, W), (H, W, 1) or equal-channel (H, W, 3)
    array, uint8 / float in [0, 1] / bool) of the image's size `expected` -> (1, 1, H, W) of 0/1 at `size`."""
    grey = as_mask_image(mask)                                                   # 8-bit greyscale PIL image
    if grey.size != tuple(expected):
        raise ValueError(f"mask_image must have the init image's size {expected[0]}x{expected[1]} (width x height), "
                         f"got {grey.size[0]}x{grey.size[1]}")
    arr = np.asarray(grey, dtype=np.float32) / MAX_BYTE                         # (H, W) in [0, 1]
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
    # 0. every argument checked before any work, by the rules `generate` uses
    output_type = require_choice(output_type, "output_type", OUTPUT_TYPES)
    strength = require_strength(strength)
    prompts, negatives = require_prompts(prompt, negative_prompt)
    num_images = require_int(num_images, "num_images", 1)
    num_inference_steps = require_steps(num_inference_steps, pipe.scheduler.num_train_timesteps)
    guidance_scale = require_scale(guidance_scale, "guidance_scale", low=0.0)
    sampler = require_edit_sampler(sampler)
    keep_original_pixels = require_flag(keep_original_pixels, "keep_original_pixels")
    generator = seeded_generator(seed)
    picture = as_rgb_image(init_image)                                         # RGB PIL image
    image = pipe.image_to_tensor(picture, height, width).to(pipe.device)       # (1, 3, H, W) in [-1, 1]
    size = (image.shape[-1], image.shape[-2])
    mask = mask_to_tensor(mask_image, size, expected=picture.size).to(pipe.device)
    if mask.sum() == 0:
        raise ValueError("mask_image is all black: nothing to repaint (white = repaint, black = keep)")

    # 1. the picture's latents
    keep_latents_mask = 1 - latent_mask(mask, pipe.vae_factor).to(pipe.dtype)  # (1, 1, h, w): 1 = keep
    with pipe._on_device(pipe.encoder):
        encoder_dtype = next(pipe.encoder.parameters()).dtype
        original = pipe.encoder(image.to(encoder_dtype)).to(pipe.dtype)        # (1, 4, h, w), the posterior mean

    # 2. the text, then noise for every image of the batch
    context = pipe.encode_prompt(prompts).repeat_interleave(num_images, dim=0)   # (B, 77, D)
    uncond = pipe.encode_prompt(negatives).repeat_interleave(num_images, dim=0) if guidance_scale > 1 else None
    shape = (context.shape[0], *original.shape[1:])
    noise = randn(shape, generator, pipe.dtype, pipe.device)                  # (B, 4, h, w), one draw for all steps
    levels = pipe.scheduler.noise_levels(num_inference_steps, sampler)
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
