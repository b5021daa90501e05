"""The sampling loop with two hooks, for the edits that change the latent or the noise prediction at every step.

It walks a run's noise levels (`DiffusionScheduler.noise_levels`, sd/samplers.py) with classifier-free guidance
and DDIM's update (or DDPM's), and lets an edit step in:
- `adjust_eps(i, x_t, eps, alpha_bar_t)` may return a changed noise prediction (guidance by a loss);
- `after_step(i, x)` may return a changed latent after the update (inpainting's latent blending).
x_t is the variance-preserving latent the UNet sees: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
The edits use the two variance-preserving samplers, whose latent is x_t at every step; the hooks need no
conversion there.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..samplers import NoiseLevels, ddim_step, ddpm_step, randn
from ..validation import MAX_SEED, require_seed

EDIT_SAMPLERS = ("ddim", "ddpm")


def require_edit_sampler(sampler: str) -> str:
    """One of the variance-preserving samplers, whose latent is x_t at every step (what the hooks expect)."""
    if not isinstance(sampler, str) or sampler not in EDIT_SAMPLERS:
        raise ValueError(f"sampler must be one of {EDIT_SAMPLERS} for editing (their latent is x_t at every step), "
                         f"got {sampler!r}")
    return sampler


def seeded_generator(seed: int | None, name: str = "seed") -> torch.Generator:
    """A CPU generator from one seed (validated as generate's: an integer in [0, 2**64 - 1]); None: a random seed."""
    seed = require_seed(seed, name)
    return torch.Generator("cpu").manual_seed(random.randrange(MAX_SEED + 1) if seed is None else seed)


def guided_eps(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when `uncond` is given and guidance_scale > 1."""
    if uncond is None or guidance_scale <= 1:
        return unet(x_t, context, t)
    # (B, 4, h, w) -> (2B, 4, h, w) -> two (B, 4, h, w) halves, the unconditional first as in diffusers
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.cat([uncond, context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # Ho & Salimans 2022, eq. 6


def denoise(unet, levels: NoiseLevels, x: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None = None,
            guidance_scale: float = 7.5, first: int = 0, generator: torch.Generator | None = None,
            sampler: str = "ddim", adjust_eps: Callable | None = None, after_step: Callable | None = None,
            progress: bool = False) -> torch.Tensor:
    """Run steps first..n-1 from x_t at level `first` and return the clean latent."""
    require_edit_sampler(sampler)
    timesteps = levels.timesteps.to(x.device)
    alpha_bars = levels.alpha_bars.to(x.device)
    for i in tqdm(range(first, len(timesteps)), disable=not progress, desc="sampling"):
        with torch.no_grad():
            eps = guided_eps(unet, x, timesteps[i], context, uncond, guidance_scale)
        if adjust_eps is not None:
            eps = adjust_eps(i, x, eps, alpha_bars[i])
        with torch.no_grad():
            if sampler == "ddim":
                x, _ = ddim_step(x, eps, alpha_bars[i], alpha_bars[i + 1])            # Song et al. 2021, eq. 12
            else:
                noise = randn(x.shape, generator, x.dtype, x.device) if i + 1 < len(timesteps) else torch.zeros_like(x)
                x, _ = ddpm_step(x, eps, alpha_bars[i], alpha_bars[i + 1], noise)      # Ho et al. 2020, eq. 6-7
        if after_step is not None:
            x = after_step(i, x)
    return x
