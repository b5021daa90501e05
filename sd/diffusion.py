"""SD v1's noise schedule and the sampling loop: from Gaussian noise (or a noised image) to clean latents.

Forward process (Ho et al. 2020, eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, with
alpha_bar_t = prod_{s<=t} (1 - beta_s). The UNet learns to predict eps; a sampler (`sd/samplers.py`)
walks back from t = 999 towards 0 in num_inference_steps jumps.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .samplers import SAMPLERS, SAMPLING_LOOPS, NoiseLevels, StepCallback, noise_levels, q_sample, randn, sigma_of

# SD v1's training schedule, from the original config (v1-inference.yaml: linear_start, linear_end, timesteps):
# "scaled linear" betas, linear in sqrt(beta).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# The shape the seed samples when no shape is given: one 512 x 512 image is a (1, 4, 64, 64) latent.
DEFAULT_LATENT_SHAPE = (1, 4, 64, 64)
# Min-SNR loss weighting's clip, Hang et al. 2023 ("Efficient Diffusion Training via Min-SNR Weighting Strategy").
MIN_SNR_GAMMA = 5.0

__all__ = ["DiffusionScheduler", "SAMPLERS"]


class DiffusionScheduler:
    """SD v1's noise schedule (1000 steps, scaled-linear betas, epsilon prediction) and its samplers."""

    default_sampler = "ddim"        # what StableDiffusion.generate runs when no sampler is named

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 beta_start: float = BETA_START, beta_end: float = BETA_END):
        self.num_train_timesteps = num_train_timesteps
        # In float32, as diffusers does (CompVis computes in float64; alpha_bar then differs by < 1e-6 relative).
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                    dtype=torch.float32) ** 2  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, (T,)

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each training timestep."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras et al.'s noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the one Euler samplers use."""
        return sigma_of(self.alphas_cumprod)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form, Ho et al. 2020, eq. 4; t an int, a 0-d tensor or one per sample (B,)."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        t = torch.as_tensor(t, device=x0.device)
        if t.dtype.is_floating_point or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x0.shape[0]):
            raise ValueError(f"t must be an int or integer tensor of shape () or ({x0.shape[0]},) "
                             f"(one per sample), got {t.dtype} of shape {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"t must be in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        alpha_bar_t = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        alpha_bar_t = alpha_bar_t.reshape(-1, *([1] * (x0.dim() - 1)))  # (B,) -> (B, 1, 1, 1)
        return q_sample(x0, noise, alpha_bar_t)

    def noise_levels(self, num_inference_steps: int, sampler: str = "ddim", *,
                     use_karras_sigmas: bool = False) -> NoiseLevels:
        """The noise levels a run of `sampler` (one of SAMPLERS) visits in num_inference_steps steps."""
        self._require_steps(num_inference_steps)
        return noise_levels(sampler, self.alphas_cumprod, num_inference_steps, use_karras_sigmas=use_karras_sigmas)

    def timesteps(self, num_inference_steps: int, sampler: str = "ddim", *,
                  use_karras_sigmas: bool = False) -> torch.Tensor:
        """The timesteps a run visits: SD's "leading" spacing plus 1 (50 steps -> 981, 961, ..., 1)."""
        return self.noise_levels(num_inference_steps, sampler, use_karras_sigmas=use_karras_sigmas).timesteps

    def _require_steps(self, num_inference_steps) -> None:
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                or not 1 <= num_inference_steps <= self.num_train_timesteps):
            raise ValueError(f"num_inference_steps must be an integer from 1 to {self.num_train_timesteps} "
                             f"(the training steps), got {num_inference_steps!r}")

    @torch.no_grad()
    def sample(self, unet: Callable, context: torch.Tensor, shape: tuple | None = None, *,
               num_inference_steps: int = 50, sampler: str = "ddim", uncond_context: torch.Tensor | None = None,
               guidance_scale: float = 7.5, eta: float = 0.0, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None, callback: StepCallback | None = None, progress: bool = True,
               init_latents: torch.Tensor | None = None, strength: float = 1.0,
               use_karras_sigmas: bool = False) -> torch.Tensor:
        """Denoise from noise (or from `init_latents` noised to `strength`) and return the clean latents.

        unet(x, context, t) predicts the noise. The latent shape is `shape`, else that of the given latents, else
        the seed's (1, 4, 64, 64). With uncond_context and guidance_scale > 1, classifier-free guidance
        (Ho & Salimans 2022) runs both passes as one batch. callback(i, t, x_t, pred_x0) sees every step; x_t is
        the latent the step starts from, in the sampler's own form (Euler-type: x_0 + sigma * noise).
        """
        # 1. check the arguments; the latent shape
        self._require_steps(num_inference_steps)
        if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and 0 < strength <= 1):
            raise ValueError(f"strength must be in (0, 1] (how much of the image to repaint), got {strength!r}")
        if eta != 0 and sampler != "ddim":
            raise ValueError(f"eta applies to sampler='ddim' only, got eta={eta} with sampler={sampler!r}")
        if not (isinstance(context, torch.Tensor) and context.dim() == 3):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must be a (B, 77, D) tensor of text embeddings, got {got}")
        shape = self._latent_shape(shape, latents, init_latents)
        context, uncond_context = self._batch_contexts(context, uncond_context, shape[0])
        device, dtype = context.device, context.dtype

        # 2. the noise levels of the run; image-to-image (SDEdit, Meng et al. 2022) runs only the last `strength`
        levels = self.noise_levels(num_inference_steps, sampler, use_karras_sigmas=use_karras_sigmas)
        first = 0
        if init_latents is not None:
            first = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            if first >= num_inference_steps:
                raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step "
                                 f"to run; use strength >= 1/num_inference_steps")
            levels = levels.starting_at(first)

        # 3. the starting latent x_t at the first level: pure noise x_T, or the image noised to it (eq. 4)
        if latents is not None:
            noise = latents.to(device=device, dtype=dtype)
        else:
            noise = randn(shape, generator, dtype, device)  # (B, 4, h, w)
        x_t = noise
        if init_latents is not None:
            alpha_bar = levels.alpha_bars[0].to(device=device, dtype=dtype)
            x_t = q_sample(init_latents.to(device=device, dtype=dtype), noise, alpha_bar)

        # 4. the noise prediction the sampler asks for: the UNet, guided
        guided = uncond_context is not None and guidance_scale > 1
        if guided:
            both_contexts = torch.cat([uncond_context, context])  # (2B, 77, D): uncond first, as diffusers

        def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)  # a 0-d tensor, as diffusers passes it
            if not guided:
                return unet(x, context, t)
            # (B, 4, h, w) -> (2B, 4, h, w) -> two (B, 4, h, w) halves
            eps_uncond, eps_cond = unet(torch.cat([x, x]), both_contexts, t).chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # Ho & Salimans 2022, eq. 6, g = 1 + w

        # 5. the sampler's loop; the callback counts steps from the start of the whole run
        on_step = None if callback is None else (lambda i, t, x, pred_x0: callback(first + i, t, x, pred_x0))
        options = {"eta": eta} if sampler == "ddim" else {}
        return SAMPLING_LOOPS[sampler](predict_noise, x_t, levels, generator=generator, callback=on_step,
                                       progress=progress, **options)

    @staticmethod
    def _latent_shape(shape, latents, init_latents) -> tuple:
        """The latent shape (B, C, h, w): `shape`, else that of the given latents, else the seed's; they must agree."""
        given = [tuple(x.shape) for x in (latents, init_latents) if x is not None]
        if len(given) == 2 and given[0] != given[1]:
            raise ValueError(f"latents (the noise) {given[0]} and init_latents {given[1]} must have the same shape")
        if shape is not None and given and tuple(shape) != given[0]:
            raise ValueError(f"shape {tuple(shape)} disagrees with the given latents {given[0]}")
        shape = tuple(shape) if shape is not None else given[0] if given else DEFAULT_LATENT_SHAPE
        if len(shape) != 4:
            raise ValueError(f"shape must be (B, C, H, W) of the latent, got {shape}")
        return shape

    @staticmethod
    def _batch_contexts(context, uncond_context, batch):
        """Repeat a single prompt's embedding to the batch; check that the shapes fit."""
        if context.shape[0] not in (1, batch):
            raise ValueError(f"context has batch {context.shape[0]}, expected 1 or the latent batch {batch}")
        context = context.expand(batch, -1, -1)
        if uncond_context is not None:
            if uncond_context.shape[0] not in (1, batch) or uncond_context.shape[1:] != context.shape[1:]:
                raise ValueError(f"uncond_context {tuple(uncond_context.shape)} must match context "
                                 f"{tuple(context.shape)} (batch 1 or {batch})")
            uncond_context = uncond_context.to(device=context.device, dtype=context.dtype).expand(batch, -1, -1)
        return context, uncond_context


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """(T,) min-SNR weights of the noise-prediction loss: min(SNR(t), gamma) / SNR(t), with
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t).

    Hang et al. 2023 weigh the x_0 error by min(SNR, gamma); for an epsilon-predicting UNet, whose x_0 error is the
    epsilon error / SNR, that is this weight on the epsilon error: 1 at the noisy steps (SNR <= gamma), less on the
    nearly clean ones. (diffusers' train_text_to_image.py --snr_gamma computes the same for epsilon-prediction.)
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    if not ((alphas_cumprod >= 0) & (alphas_cumprod <= 1)).all():
        raise ValueError("alphas_cumprod must lie in [0, 1] (a schedule's alpha_bar)")
    snr = alphas_cumprod / (1 - alphas_cumprod)                 # inf at alpha_bar = 1, 0 at alpha_bar = 0
    # at SNR = 0 (a zero-terminal-SNR schedule's last step) the weight's limit, min(SNR, gamma) / SNR -> 1
    return torch.where(snr > 0, snr.clamp(max=gamma) / snr, torch.ones_like(snr))


def diffusion_loss(unet, scheduler: DiffusionScheduler, z0: torch.Tensor, context: torch.Tensor,
                   generator: torch.Generator, weight: torch.Tensor | None = None) -> torch.Tensor:
    """SD's training objective on clean latents z0 (B, 4, h, w): MSE between the true and predicted noise.

    Ho et al. 2020, algorithm 1; Rombach et al. 2022, eq. 2. Here, next to the schedule it noises with, because
    both the UNet's training (sd/training/unet.py) and textual inversion (sd/adapters/) minimise it.
    weight: None (SD's plain mean), or (T,) per-timestep weights (e.g. min_snr_weights): each sample's mean squared
    error times weight[t], averaged over the batch.
    """
    b = z0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator).to(z0.device)   # (B,)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device)
    z_t = scheduler.add_noise(z0, eps, t)          # Ho et al. 2020, eq. 4
    pred = unet(z_t, context, t).float()
    if weight is None:
        return F.mse_loss(pred, eps)
    if weight.shape != (scheduler.num_train_timesteps,):
        raise ValueError(f"weight must hold one number per training timestep, shape "
                         f"({scheduler.num_train_timesteps},), got {tuple(weight.shape)}")
    per_sample = (pred - eps).pow(2).flatten(1).mean(dim=1)                    # (B,)
    return (weight.to(per_sample.device)[t] * per_sample).mean()
