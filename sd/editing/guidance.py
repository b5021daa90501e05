"""Guidance by a differentiable loss on the predicted clean latent x0_hat, at every sampling step.

Classifier guidance (Dhariwal & Nichol 2021, eq. 14) shifts the noise prediction along the gradient of a log
probability; any differentiable loss L can stand in for -log p (Bansal et al. 2023, "Universal guidance"):
    eps_hat = eps + scale * sqrt(1 - alpha_bar_t) * grad_{x_t} L(x0_hat(x_t)),
with x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Ho et al. 2020, eq. 15) and eps held fixed
(no gradient through the UNet: one VAE-decoder backward per step, not a UNet one). The sampler then moves x0_hat
downhill on L. A loss on pixels decodes x0_hat with the VAE decoder, e.g. `colour_loss` pulls towards a colour.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ..images import to_pil
from ..samplers import predict_x0, randn
from .loop import denoise, require_edit_sampler


def loss_guidance(loss_fn: Callable[[torch.Tensor], torch.Tensor], scale: float) -> Callable:
    """An `adjust_eps` hook for sd/editing/loop.py: eps moved so that x0_hat lowers loss_fn(x0_hat)."""
    def adjust_eps(i: int, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            loss = loss_fn(predict_x0(x, eps.detach(), alpha_bar_t))
            (grad,) = torch.autograd.grad(loss, x)
        return eps + scale * (1 - alpha_bar_t) ** 0.5 * grad
    return adjust_eps


def colour_loss(pipe, rgb: tuple[float, float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A loss on latents: mean squared distance of the decoded pixels (in [0, 1]) to the colour `rgb` (in [0, 1])."""
    if len(rgb) != 3 or not all(0 <= c <= 1 for c in rgb):
        raise ValueError(f"rgb must be three numbers in [0, 1], got {rgb!r}")
    target = torch.tensor(rgb, device=pipe.device).view(1, 3, 1, 1)

    def loss(x0_hat: torch.Tensor) -> torch.Tensor:
        decoder_dtype = next(pipe.decoder.parameters()).dtype
        pixels = pipe.decoder(x0_hat.to(decoder_dtype)).float() / 2 + 0.5     # (B, 3, H, W), [-1, 1] -> [0, 1]
        return (pixels - target).pow(2).mean()
    return loss


@torch.no_grad()
def generate_with_loss(pipe, prompt: str, loss_fn: Callable[[torch.Tensor], torch.Tensor], loss_scale: float, *,
                       negative_prompt: str = "", height: int | None = None, width: int | None = None,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "ddim",
                       seed: int | None = None, progress: bool = True, output_type: str = "pil"):
    """Text to image, each step also pulled by the loss on x0_hat (loss_scale = 0: plain generation)."""
    height, width = height or pipe.native_size, width or pipe.native_size
    pipe._check_size("height", height)
    pipe._check_size("width", width)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_factor, width // pipe.vae_factor)
    generator = torch.Generator("cpu").manual_seed(random.randrange(2 ** 63) if seed is None else seed)
    context = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([negative_prompt]) if guidance_scale > 1 else None
    levels = pipe.scheduler.noise_levels(num_inference_steps, require_edit_sampler(sampler))
    x = randn(shape, generator, pipe.dtype, pipe.device)                  # x_T: pure noise at the first level
    with pipe._on_device(pipe.unet), pipe._on_device(pipe.decoder):
        latents = denoise(pipe.unet, levels, x, context, uncond, guidance_scale, generator=generator, sampler=sampler,
                          adjust_eps=loss_guidance(loss_fn, loss_scale) if loss_scale else None, progress=progress)
    images = pipe.decode(latents)
    return images if output_type == "pt" else to_pil(images)
