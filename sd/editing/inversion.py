"""DDIM inversion: run the deterministic DDIM sampler backwards, from an image's latents to the noise x_T that
the sampler turns back into (nearly) that image.

DDIM with eta = 0 is a discretised ODE (Song et al. 2021, sec. 4.3, eq. 14): the same update rule (eq. 12)
taken from the lower noise level to the higher one inverts a step, with the noise prediction made at the
step's own timestep on the less noisy latent (the approximation eps(x_prev, t) ~ eps(x_t, t), exact as the
steps shrink; Dhariwal & Nichol 2021, appendix F). Then
    x_T = invert(pipe, image, prompt)
    pipe.generate(prompt, latents=x_T, sampler="ddim", guidance_scale=1.0)  # ~ the image
Guidance > 1 makes the approximation worse (Mokady et al. 2023, "Null-text inversion"): keep 1 to reconstruct.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..samplers import predict_x0
from ..validation import require_scale, require_steps, require_text
from .loop import guided_eps


@torch.no_grad()
def invert(pipe, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 1.0, *,
           negative_prompt: str = "", height: int | None = None, width: int | None = None,
           progress: bool = True) -> torch.Tensor:
    """An image (PIL or array, sd/images.py's conventions) -> the DDIM noise x_T (1, 4, h, w) from which `generate` redraws it."""
    # 0. every argument checked before any work, by the rules `generate` uses
    prompt, negative_prompt = require_text(prompt, "prompt"), require_text(negative_prompt, "negative_prompt")
    num_inference_steps = require_steps(num_inference_steps, pipe.scheduler.num_train_timesteps)
    guidance_scale = require_scale(guidance_scale, "guidance_scale", low=0.0)
    picture = pipe.image_to_tensor(image, height, width, name="image").to(pipe.device)   # (1, 3, H, W) in [-1, 1]
    with pipe._on_device(pipe.encoder):
        encoder_dtype = next(pipe.encoder.parameters()).dtype
        x = pipe.encoder(picture.to(encoder_dtype)).to(pipe.dtype)             # (1, 4, h, w), the posterior mean
    context = pipe.encode_prompt([prompt])                                     # (1, 77, D)
    uncond = pipe.encode_prompt([negative_prompt]) if guidance_scale > 1 else None
    levels = pipe.scheduler.noise_levels(num_inference_steps, "ddim")
    timesteps, alpha_bars = levels.timesteps.to(pipe.device), levels.alpha_bars.to(pipe.device)   # (n,), (n + 1,)
    with pipe._on_device(pipe.unet):
        # sampling visits steps 0..n-1 (t = 981 ... 1 for 50 steps); inversion walks them from the last to the first
        for i in tqdm(reversed(range(num_inference_steps)), total=num_inference_steps, disable=not progress,
                      desc="DDIM inversion"):
            eps = guided_eps(pipe.unet, x, timesteps[i], context, uncond, guidance_scale)
            # eq. 12 with eta = 0, from alpha_bar_prev (less noise) up to alpha_bar_t: the sampler's step i, undone
            alpha_bar_low, alpha_bar_high = alpha_bars[i + 1], alpha_bars[i]
            pred_x0 = predict_x0(x, eps, alpha_bar_low)
            x = alpha_bar_high ** 0.5 * pred_x0 + (1 - alpha_bar_high) ** 0.5 * eps
    return x
