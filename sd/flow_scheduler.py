"""How the pipeline samples a model that predicts the flow's velocity (the transformer of sd/mmdit.py).

The flow ODE dx/dt = v(x, t) runs from t = 1 (noise) to t = 0 (data); Euler steps over the times
FlowMatchEulerDiscreteScheduler uses (sd/flow_matching.py `flow_sigmas`), with classifier-free guidance on the
velocity, v = v_uncond + scale (v_cond - v_uncond), as SD3's pipeline does. Image to image starts part of the way:
at t = strength the picture's latent z becomes (1 - t) z + t eps, and the last steps run from there.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import trange

from .flow_matching import NUM_TRAIN_TIMESTEPS, flow_sigmas
from .mmdit import TIME_SCALE
from .samplers import randn

# The one sampler of a flow model (named as its twin in the sigma view: Euler on the probability-flow ODE).
FLOW_SAMPLERS = ("euler",)


class FlowScheduler:
    """Euler sampling of a velocity-predicting model, with SD3's time shift."""

    default_sampler = "euler"
    samplers = FLOW_SAMPLERS

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

    def require_sampler(self, sampler: str) -> str:
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not fit this model: it predicts the flow's velocity "
                             f"(a transformer trained with flow matching), its sampler is "
                             f"{' or '.join(map(repr, FLOW_SAMPLERS))}")
        return sampler

    def times(self, num_inference_steps: int) -> torch.Tensor:
        """The num_inference_steps + 1 times of a run, from near 1 down to 0."""
        return flow_sigmas(num_inference_steps, self.shift, self.num_train_timesteps)

    @torch.no_grad()
    def sample(self, model: Callable, context: torch.Tensor, shape: tuple, *, num_inference_steps: int = 50,
               sampler: str = "euler", uncond_context: torch.Tensor | None = None, guidance_scale: float = 7.5,
               generator=None, latents: torch.Tensor | None = None, init_latents: torch.Tensor | None = None,
               strength: float = 1.0, callback: Callable | None = None, progress: bool = True,
               eta: float = 0.0) -> torch.Tensor:
        """Noise (or init_latents noised to t = strength) -> clean latents. model(x, context, 1000 t) -> velocity.
        callback(i, t, x_t, pred_x0) sees every step, with pred_x0 = x_t - t v."""
        self.require_sampler(sampler)
        if eta != 0:
            raise ValueError(f"eta applies to sampler='ddim' of noise-predicting models; a flow model samples "
                             f"deterministically, got eta={eta}")
        device, dtype = context.device, context.dtype
        times = self.times(num_inference_steps)
        first = 0
        if init_latents is not None:
            first = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            if first >= num_inference_steps:
                raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step "
                                 f"to run; use strength >= 1/num_inference_steps")
        noise = latents.to(device, dtype) if latents is not None else randn(shape, generator, dtype, device)
        x = noise
        if init_latents is not None:       # the straight path at the first time: (1 - t) z + t eps
            t0 = times[first].to(device, dtype)
            x = (1 - t0) * init_latents.to(device, dtype) + t0 * noise

        guided = uncond_context is not None and guidance_scale > 1
        both_contexts = torch.cat([uncond_context, context]) if guided else None   # uncond first, as diffusers

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = (t * TIME_SCALE).to(device)
            if not guided:
                return model(x, context, t)
            v_uncond, v_cond = model(torch.cat([x, x]), both_contexts, t).chunk(2)   # two (B, C, h, w)
            return v_uncond + guidance_scale * (v_cond - v_uncond)

        for i in trange(first, num_inference_steps, disable=not progress, desc="sampling (flow euler)"):
            t, t_next = times[i].to(device, dtype), times[i + 1].to(device, dtype)
            v = velocity(x, t)
            if callback is not None:
                callback(i, t, x, x - t * v)
            x = x + (t_next - t) * v            # Euler: dt is negative, towards the data
        return x
