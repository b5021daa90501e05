"""Walking between two images: text embeddings linearly, starting noise spherically (slerp).

Gaussian noise in d dimensions lives near the sphere of radius sqrt(d); the straight line between two draws
cuts inside it (its midpoint has norm ~ sqrt(d / 2)), where the model never saw a starting latent, and the
images fade to grey. slerp (Shoemake 1985) follows the great circle instead and keeps the norm.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..images import to_pil
from ..samplers import SAMPLERS, randn, require_sampler
from ..validation import require_choice, require_int, require_scale, require_steps, require_text
from .loop import seeded_generator

# Below this angle between the two tensors slerp is numerically a straight line: use lerp.
PARALLEL_EPS = 1e-4


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b."""
    return a + t * (b - a)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: sin((1-t) w) / sin w * a + sin(t w) / sin w * b, w the angle between a and b."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos_w = (a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)
    w = torch.arccos(cos_w)
    if w < PARALLEL_EPS:
        return lerp(a, b, t)
    out = (torch.sin((1 - t) * w) * a64 + torch.sin(t * w) * b64) / torch.sin(w)
    return out.reshape(a.shape).to(a.dtype)


@torch.no_grad()
def interpolate(pipe, prompt_a: str, prompt_b: str, num_frames: int = 5, *, seed_a: int | None = None,
                seed_b: int | None = None, height: int | None = None, width: int | None = None,
                num_inference_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "ddim",
                negative_prompt: str = "", progress: bool = True, output_type: str = "pil"):
    """num_frames images from (prompt_a, noise of seed_a) to (prompt_b, noise of seed_b); one progress bar over frames."""
    # 0. every argument checked before any work, by the rules `generate` uses
    prompt_a, prompt_b = require_text(prompt_a, "prompt_a"), require_text(prompt_b, "prompt_b")
    negative_prompt = require_text(negative_prompt, "negative_prompt")
    num_frames = require_int(num_frames, "num_frames", 2)       # the two ends included
    num_inference_steps = require_steps(num_inference_steps, pipe.scheduler.num_train_timesteps)
    guidance_scale = require_scale(guidance_scale, "guidance_scale", low=0.0)
    sampler = require_sampler(require_choice(sampler, "sampler", SAMPLERS), num_inference_steps)
    output_type = require_choice(output_type, "output_type", ("pil", "pt"))
    generators = [seeded_generator(seed_a, "seed_a"), seeded_generator(seed_b, "seed_b")]
    height, width = height or pipe.native_size, width or pipe.native_size
    pipe._check_size("height", height)
    pipe._check_size("width", width)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_factor, width // pipe.vae_factor)

    # 1. the two ends: noise and text
    noises = [randn(shape, g, pipe.dtype, pipe.device) for g in generators]       # (1, 4, h, w) each
    text_a, text_b = pipe.encode_prompt([prompt_a]), pipe.encode_prompt([prompt_b])    # (1, 77, D) each
    uncond = pipe.encode_prompt([negative_prompt]) if guidance_scale > 1 else None

    # 2. one image per frame, noise along the great circle, text along the straight line
    frames = []
    with pipe._on_device(pipe.unet):
        for k in tqdm(range(num_frames), disable=not progress, desc="interpolation frames"):
            t = k / (num_frames - 1)
            frames.append(pipe.scheduler.sample(
                pipe.unet, lerp(text_a, text_b, t), num_inference_steps=num_inference_steps, sampler=sampler,
                uncond_context=uncond, guidance_scale=guidance_scale, latents=slerp(*noises, t), progress=False))
    images = pipe.decode(torch.cat(frames))                                    # (num_frames, 3, H, W) in [0, 1]
    return images if output_type == "pt" else to_pil(images)
