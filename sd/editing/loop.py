"""The sampling loop with two hooks, for the edits that change the latent or the noise prediction at every step.

It walks the same per-run schedule as `DiffusionScheduler.sample` (a sampler of sd/samplers.py: timesteps,
input scaling, update rule) with classifier-free guidance, and lets an edit step in:
- `adjust_eps(i, x_t, eps, alpha_bar_t)` may return a changed noise prediction (guidance by a loss);
- `after_step(i, x)` may return a changed latent after the update (inpainting's latent blending).
x_t is always the variance-preserving latent the UNet sees, so alpha_bar_t is the one of eq. 4 of Ho et al. 2020
for every sampler (Euler-type samplers: alpha_bar = 1 / (1 + sigma^2)).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm


def guided_eps(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when `uncond` is given and guidance_scale > 1."""
    if uncond is None or guidance_scale <= 1:
        return unet(x_t, context, t)
    # (B, 4, h, w) -> (2B, 4, h, w) -> two (B, 4, h, w) halves, the unconditional first as in diffusers
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.cat([uncond, context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # Ho & Salimans 2022, eq. 6


def alpha_bar_of(plan, i: int) -> torch.Tensor:
    """alpha_bar at the plan's i-th step, also for the Euler-type samplers that keep sigma instead."""
    if hasattr(plan, "alpha_bar"):
        return plan.alpha_bar[i]
    return 1 / (1 + plan.sigmas[i] ** 2)          # sigma^2 = (1 - alpha_bar) / alpha_bar


def denoise(unet, plan, x: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None = None,
            guidance_scale: float = 7.5, first: int = 0, generator: torch.Generator | None = None,
            adjust_eps: Callable | None = None, after_step: Callable | None = None,
            progress: bool = False) -> torch.Tensor:
    """Run the plan's steps first..n-1 from the latent x (in the sampler's own form) and return the clean latent."""
    timesteps = plan.timesteps.to(x.device)
    for i in tqdm(range(first, len(plan.timesteps)), disable=not progress, desc="sampling"):
        x_t = plan.scale_model_input(x, i)                    # the variance-preserving latent the UNet sees
        with torch.no_grad():
            eps = guided_eps(unet, x_t, timesteps[i], context, uncond, guidance_scale)
        if adjust_eps is not None:
            eps = adjust_eps(i, x_t, eps, alpha_bar_of(plan, i).to(x.device))
        with torch.no_grad():
            x, _ = plan.step(i, x, eps, generator)
        if after_step is not None:
            x = after_step(i, x)
    return x
