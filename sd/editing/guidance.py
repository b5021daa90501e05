"""Guidance by a differentiable loss on the predicted clean latent x0_hat, at every sampling step.

Classifier guidance (Dhariwal & Nichol 2021, eq. 14) shifts the noise prediction along the gradient of a log
probability; any differentiable loss L can stand in for -log p (Bansal et al. 2023, "Universal guidance"):
    eps_hat = eps + scale * sqrt(1 - alpha_bar_t) * grad_{x_t} L(x0_hat(x_t)),
with x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Ho et al. 2020, eq. 15) and eps held fixed
(no gradient through the UNet: one VAE-decoder backward per step, not a UNet one). The sampler then moves x0_hat
downhill on L. A loss on pixels decodes x0_hat with the VAE decoder, e.g. `colour_loss` pulls towards a colour.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..images import to_pil
from ..samplers import predict_x0, randn
from ..validation import require_choice, require_number, require_scale, require_steps, require_text
from .loop import denoise, require_edit_sampler, seeded_generator


def loss_guidance(loss_fn: Callable[[torch.Tensor], torch.Tensor], scale: float) -> Callable:
    """An `adjust_eps` hook for sd/editing/loop.py: eps moved so that x0_hat lowers loss_fn(x0_hat)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (x0_hat -> a scalar loss), got {type(loss_fn).__name__}")
    scale = require_scale(scale, "loss_scale")
    def adjust_eps(i: int, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            loss = loss_fn(predict_x0(x, eps.detach(), alpha_bar_t))
            (grad,) = torch.autograd.grad(loss, x)
        return eps + scale * (1 - alpha_bar_t) ** 0.5 * grad
    return adjust_eps


def colour_loss(pipe, rgb: tuple[float, float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A loss on latents: mean squared distance of the decoded pixels (in [0, 1]) to the colour `rgb` (in [0, 1])."""
    if not isinstance(rgb, (tuple, list)) or len(rgb) != 3:
        raise ValueError(f"rgb must be three numbers in [0, 1], got {rgb!r}")
    rgb = tuple(require_number(c, "each rgb value", 0.0, 1.0) for c in rgb)
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
    # 0. every argument checked before any work, by the rules `generate` uses
    prompt, negative_prompt = require_text(prompt, "prompt"), require_text(negative_prompt, "negative_prompt")
    hook = loss_guidance(loss_fn, loss_scale)
    num_inference_steps = require_steps(num_inference_steps, pipe.scheduler.num_train_timesteps)
    guidance_scale = require_scale(guidance_scale, "guidance_scale", low=0.0)
    sampler = require_edit_sampler(sampler)
    output_type = require_choice(output_type, "output_type", ("pil", "pt"))
    generator = seeded_generator(seed)
    height, width = height or pipe.native_size, width or pipe.native_size
    pipe._check_size("height", height)
    pipe._check_size("width", width)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_factor, width // pipe.vae_factor)

    # 1. text, noise, then the guided loop
    context = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([negative_prompt]) if guidance_scale > 1 else None
    levels = pipe.scheduler.noise_levels(num_inference_steps, sampler)
    x = randn(shape, generator, pipe.dtype, pipe.device)                  # x_T: pure noise at the first level
    with pipe._on_device(pipe.unet), pipe._on_device(pipe.decoder):
        latents = denoise(pipe.unet, levels, x, context, uncond, guidance_scale, generator=generator, sampler=sampler,
                          adjust_eps=hook if loss_scale else None, progress=progress)
    images = pipe.decode(latents)
    return images if output_type == "pt" else to_pil(images)
