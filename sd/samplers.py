"""The six samplers, each one function with one loop over the noise levels of its run (k-diffusion's layout).

A sampler walks from noise at the first noise level to a clean latent, asking `predict_noise(x_t, t)` for the
UNet's (guided) noise prediction eps at every step. Two families share this file:

- variance-preserving samplers (DDPM, DDIM, DPM-Solver++) work on the latent x_t the UNet sees:
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
- Euler-type samplers (Euler, Euler ancestral) work with Karras et al.'s noise level
  sigma = sqrt((1 - alpha_bar) / alpha_bar) and the unscaled latent x = x_0 + sigma eps = x_t * sqrt(1 + sigma^2);
  the UNet still wants x_t, so its input is divided back.

A third kind, LCM (Luo et al. 2023), is for a UNet distilled into a consistency model (an LCM, or SD with an
LCM-LoRA): at each timestep it jumps straight to a clean estimate, then noises that to the next timestep.

Every sampler takes x_t at its first noise level and returns the latent at its last, so the caller starts and
ends the same way for all five. `noise_levels` computes, once per run, what the loops read; with the same inputs
each loop gives the numbers of the corresponding diffusers scheduler configured like SD v1.5.
The per-step update rules of notebook 07 (`predict_x0`, `ddpm_step`, `ddim_step`) are the learner's exercises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import trange

# SD v1's inference timesteps are shifted by one ("steps_offset": 1 in its scheduler config):
# 50 steps visit 981, 961, ..., 1 instead of 980, ..., 0.
STEPS_OFFSET = 1
# Karras et al. 2022, eq. 5: rho = 7 spaces the noise levels densely near sigma_min.
KARRAS_RHO = 7.0
# Floor on the DDPM posterior variance (diffusers clamps it so that its square root stays finite).
MIN_DDPM_VARIANCE = 1e-20
# LCM's schedule and boundary conditions, as diffusers' LCMScheduler sets them for SD v1.5 (its defaults, the
# values of the LCM and LCM-LoRA distillation scripts), https://github.com/huggingface/diffusers/blob/v0.42.1/
# src/diffusers/schedulers/scheduling_lcm.py#L211 (original_inference_steps), #L221 (timestep_scaling),
# #L562 (sigma_data). The student was distilled on 50 DDIM timesteps, 999, 979, ..., 19, and a run visits n of them.
LCM_ORIGINAL_STEPS = 50
# c_skip and c_out see the timestep times 10 ("timestep_scaling"): c_skip is 1 at t = 0 and < 1e-5 at t >= 19.
LCM_TIMESTEP_SCALING = 10.0
# The data's standard deviation the boundary conditions assume: Karras et al. 2022's sigma_data (Table 1), which
# the consistency models of Song et al. 2023 and LCM reuse.
SIGMA_DATA = 0.5

# predict_noise(x_t, t) -> eps: the UNet's noise prediction at the latent x_t and timestep t (a 0-d tensor).
NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, t, x, pred_x0): step i at timestep t starts from x (in the sampler's own form) and predicts x_0.
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]


def randn(shape, generator: torch.Generator | list[torch.Generator] | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's device (CPU) and moved, as diffusers does.

    A list of generators, one per batch row (as diffusers takes them), draws row i from generator i, so that image i
    of a batch follows the same noise as a run of that image alone. A list holding one generator again and again
    (one seed for the batch) is one draw of the whole shape from it.
    """
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per row")
        if any(g is not generator[0] for g in generator):
            return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])   # (B, ...)
        generator = generator[0]
    if generator is not None and generator.device.type != device.type:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# The forward process and the two coordinates of a noise level
# ---------------------------------------------------------------------------------------------

def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form, Ho et al. 2020, eq. 4 (CompVis' ddpm.py calls it q_sample)."""
    return alpha_bar_t ** 0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_0 implied by the predicted noise: invert x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5  # Ho et al. 2020, eq. 15


def sigma_of(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Karras et al.'s noise level of alpha_bar: x_t / sqrt(alpha_bar) = x_0 + sigma eps, Karras et al. 2022, sec. 4."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def vp_coefficients(sigma):
    """Karras' sigma -> variance-preserving alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar), and lambda_t."""
    alpha_t = 1 / (sigma ** 2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # half the log-SNR; +inf where sigma = 0
    return alpha_t, sigma_t, lambda_t


# ---------------------------------------------------------------------------------------------
# The update rules (notebook 07 has the learner write the first three)
# ---------------------------------------------------------------------------------------------

def ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    """Ancestral DDPM step: sample x_prev from the posterior q(x_prev | x_t, x_0), Ho et al. 2020, eq. 6-7.

    With skipped timesteps, alpha_t and beta_t are those of the jump t -> prev: alpha_t = alpha_bar_t / alpha_bar_prev.
    Returns (x_prev, predicted x_0).
    """
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
    # posterior mean mu_tilde(x_t, x_0), eq. 7
    mu = (alpha_bar_prev ** 0.5 * beta_t / (1 - alpha_bar_t)) * pred_x0 \
        + (alpha_t ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
    # posterior variance beta_tilde_t, eq. 7 ("fixed small" variance)
    beta_tilde = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=MIN_DDPM_VARIANCE)
    return mu + beta_tilde ** 0.5 * noise, pred_x0


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta: float = 0.0, noise=None):
    """DDIM step, Song et al. 2021, eq. 12, with sigma_t from eq. 16 (eta = 0: deterministic, eta = 1: DDPM-like).

    Returns (x_prev, predicted x_0).
    """
    pred_x0 = predict_x0(x_t, eps, alpha_bar_t)  # "predicted x_0"
    sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    dir_xt = (1 - alpha_bar_prev - sigma_t ** 2) ** 0.5 * eps  # "direction pointing to x_t"
    x_prev = alpha_bar_prev ** 0.5 * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise  # "random noise"
    return x_prev, pred_x0


def to_d(x, pred_x0, sigma):
    """dx/dsigma of the probability-flow ODE, (x - D(x; sigma)) / sigma: Karras et al. 2022, eq. 3 with sigma(t) = t."""
    return (x - pred_x0) / sigma


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of the probability-flow ODE from sigma to sigma_next, Karras et al. 2022, Alg. 1.

    x is the unscaled latent x_0 + sigma * noise. Returns (x_next, predicted x_0).
    """
    pred_x0 = x - sigma * eps  # the denoiser D(x; sigma)
    return x + to_d(x, pred_x0, sigma) * (sigma_next - sigma), pred_x0


def ancestral_sigmas(sigma, sigma_next):
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next (k-diffusion's get_ancestral_step, eta = 1).

    sigma_up is the DDPM-like (eta = 1) noise of the jump, Song et al. 2021, eq. 16 written in sigmas, and
    sigma_down^2 + sigma_up^2 = sigma_next^2: step deterministically down to sigma_down, then add fresh noise.
    """
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def consistency_scalings(t):
    """LCM's boundary conditions (c_skip, c_out) at timestep t, with s = 10 t and sigma_data = 0.5.

    The consistency function is f(x_t, t) = c_skip x_t + c_out x0_hat (Luo et al. 2023, sec. 4.1, the
    epsilon-prediction form): c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x, the boundary condition of Song et
    al. 2023; at SD's timesteps >= 19, c_skip < 1e-5 and c_out ~ 1, so f is almost the predicted x_0.
    """
    s = t * LCM_TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


# ---------------------------------------------------------------------------------------------
# The noise levels of one run, computed once
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseLevels:
    """The noise levels a run visits: n steps, each from level i to level i + 1.

    alpha_bars and sigmas are the same levels in two coordinates (sigma_of); variance-preserving samplers read
    the first, Euler-type samplers the second. Both have one more entry than timesteps: where the last step lands.
    """

    timesteps: torch.Tensor  # (n,) the t the UNet is told at each step
    alpha_bars: torch.Tensor  # (n + 1,)
    sigmas: torch.Tensor  # (n + 1,)

    def starting_at(self, first: int) -> "NoiseLevels":
        """The same run entered at step `first` (image-to-image skips the noisiest steps)."""
        return NoiseLevels(self.timesteps[first:], self.alpha_bars[first:], self.sigmas[first:])


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """SD's "leading" spacing: 0, k, 2k, ... with k = T // n, reversed, plus the offset (50 -> 981, ..., 1)."""
    step_ratio = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.int64) * step_ratio + STEPS_OFFSET


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """LCM's schedule: n of the 50 timesteps it was distilled on, at evenly spaced positions (4 -> 999, 759, 499, 259).

    The 50 are every k-th training timestep ending at T - 1 (k = T // 50: 999, 979, ..., 19); step i takes the
    one at position floor(i * 50 / n), computed in float64 as diffusers' LCMScheduler does (numpy's linspace).
    """
    k = num_train_timesteps // LCM_ORIGINAL_STEPS
    origin = torch.arange(LCM_ORIGINAL_STEPS, 0, -1, dtype=torch.int64) * k - 1      # (50,) 999, 979, ..., 19
    positions = (torch.arange(num_inference_steps, dtype=torch.float64)
                 * (LCM_ORIGINAL_STEPS / num_inference_steps)).floor().long()     # (n,)
    return origin[positions]                                                         # (n,)


def require_sampler(sampler: str, num_inference_steps: int) -> str:
    """A sampler's name (one of SAMPLERS) that can run num_inference_steps steps; else one line saying why not."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if sampler == "lcm" and num_inference_steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"num_inference_steps must be an integer from 1 to {LCM_ORIGINAL_STEPS} with sampler='lcm' "
                         f"(LCM picks its steps from the {LCM_ORIGINAL_STEPS} timesteps it was distilled on), "
                         f"got {num_inference_steps}")
    return sampler


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, Karras et al. 2022, eq. 5 (in float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma: linear interpolation of log(sigma) between training timesteps."""
    log_train = torch.log(train_sigmas).double()  # (T,), increasing
    log_sigma = torch.log(sigmas.double().clamp(min=1e-10))  # (n,)
    low = (torch.searchsorted(log_train, log_sigma, right=True) - 1).clamp(0, len(log_train) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)  # (1 - w) t_low + w t_high


def noise_levels(sampler: str, alphas_cumprod: torch.Tensor, num_inference_steps: int, *,
                 use_karras_sigmas: bool = False) -> NoiseLevels:
    """The noise levels `sampler` (one of SAMPLERS) visits in num_inference_steps steps, as diffusers sets them."""
    require_sampler(sampler, num_inference_steps)
    if use_karras_sigmas and sampler != "euler":
        raise ValueError(f"use_karras_sigmas applies to sampler='euler' only, got sampler={sampler!r}")
    n, num_train_timesteps = num_inference_steps, len(alphas_cumprod)
    # 1. timesteps: SD's "leading" spacing; diffusers' DPM-Solver divides T into n + 1 parts and drops t = 0
    #    (50 steps: 951, 932, ..., 20)
    if sampler == "dpmpp2m":
        timesteps = torch.arange(n, 0, -1, dtype=torch.int64) * (num_train_timesteps // (n + 1)) + STEPS_OFFSET
    elif sampler == "lcm":
        timesteps = lcm_timesteps(n, num_train_timesteps)  # (n,) 4 steps: 999, 759, 499, 259
    else:
        timesteps = leading_timesteps(n, num_train_timesteps)  # (n,) int64
    # 2. where the last step lands: SD's DDIM on alpha_bar_0 ("set_alpha_to_one": false), the others on x_0 itself
    #    (LCM's last step returns its clean estimate)
    final = alphas_cumprod[:1] if sampler == "ddim" else torch.ones(1, dtype=alphas_cumprod.dtype)
    alpha_bars = torch.cat([alphas_cumprod[timesteps], final])  # (n + 1,)
    sigmas = sigma_of(alpha_bars)  # (n + 1,), float32 as in diffusers
    # 3. Karras et al.'s noise levels between the same sigma_max and sigma_min, at fractional timesteps
    if use_karras_sigmas:
        karras = karras_sigmas(sigmas[-2].item(), sigmas[0].item(), n)
        timesteps = sigma_to_t(karras, sigma_of(alphas_cumprod))
        sigmas = torch.cat([karras.to(torch.float32), torch.zeros(1)])
        alpha_bars = 1 / (1 + sigmas ** 2)  # the inverse of sigma_of
    if sampler in ("euler", "euler_a"):
        timesteps = timesteps.to(torch.float32)  # the UNet gets the (float) timestep, as in diffusers
    return NoiseLevels(timesteps, alpha_bars, sigmas)


# ---------------------------------------------------------------------------------------------
# The samplers: one loop each
# ---------------------------------------------------------------------------------------------

def sample_ddpm(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020, on SD's timesteps: fresh noise at every step with t > 0."""
    x = x_t
    for i in trange(len(levels.timesteps), disable=not progress, desc="sampling (ddpm)"):
        t = levels.timesteps[i]
        eps = predict_noise(x, t)
        noise = randn(eps.shape, generator, eps.dtype, eps.device) if t > 0 else torch.zeros_like(eps)
        x_prev, pred_x0 = ddpm_step(x, eps, levels.alpha_bars[i], levels.alpha_bars[i + 1], noise)
        if callback is not None:
            callback(i, t.item(), x, pred_x0)
        x = x_prev
    return x


def sample_ddim(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *, eta: float = 0.0,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM, Song et al. 2021: deterministic with eta = 0; eta > 0 draws noise at every step (eq. 16)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    x = x_t
    for i in trange(len(levels.timesteps), disable=not progress, desc="sampling (ddim)"):
        t = levels.timesteps[i]
        eps = predict_noise(x, t)
        noise = randn(eps.shape, generator, eps.dtype, eps.device) if eta > 0 else None
        x_prev, pred_x0 = ddim_step(x, eps, levels.alpha_bars[i], levels.alpha_bars[i + 1], eta, noise)
        if callback is not None:
            callback(i, t.item(), x, pred_x0)
        x = x_prev
    return x


def sample_euler(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Euler's method on Karras et al.'s ODE, Algorithm 1 (no churn); deterministic, the generator is unused."""
    sigmas = levels.sigmas
    x = x_t * (sigmas[0] ** 2 + 1) ** 0.5  # the unscaled latent x_0 + sigma_0 eps
    for i in trange(len(levels.timesteps), disable=not progress, desc="sampling (euler)"):
        t = levels.timesteps[i]
        eps = predict_noise(x / (sigmas[i] ** 2 + 1) ** 0.5, t)  # the UNet was trained on x_t
        x_next, pred_x0 = euler_step(x.float(), eps, sigmas[i], sigmas[i + 1])  # in float32, as diffusers
        if callback is not None:
            callback(i, t.item(), x, pred_x0)
        x = x_next.to(eps.dtype)
    return x  # at sigma = 0, x = x_0 = x_t


def sample_euler_ancestral(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *,
                           generator: torch.Generator | None = None, callback: StepCallback | None = None,
                           progress: bool = False) -> torch.Tensor:
    """Euler ancestral (k-diffusion, Crowson 2022): an Euler step down to sigma_down, then noise of size sigma_up."""
    sigmas = levels.sigmas
    x = x_t * (sigmas[0] ** 2 + 1) ** 0.5  # the unscaled latent x_0 + sigma_0 eps
    for i in trange(len(levels.timesteps), disable=not progress, desc="sampling (euler_a)"):
        t, sigma = levels.timesteps[i], sigmas[i]
        eps = predict_noise(x / (sigma ** 2 + 1) ** 0.5, t)  # the UNet was trained on x_t
        x32 = x.float()  # the step in float32, as diffusers
        pred_x0 = x32 - sigma * eps  # the denoiser D(x; sigma)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigmas[i + 1])
        noise = randn(eps.shape, generator, eps.dtype, eps.device)  # drawn at every step (sigma_up = 0 at the last)
        x_next = x32 + to_d(x32, pred_x0, sigma) * (sigma_down - sigma) + noise * sigma_up
        if callback is not None:
            callback(i, t.item(), x, pred_x0)
        x = x_next.to(eps.dtype)
    return x  # at sigma = 0, x = x_0 = x_t


def sample_dpmpp_2m(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *,
                    generator: torch.Generator | None = None, callback: StepCallback | None = None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: a multistep solver in lambda = log(alpha_t / sigma_t).

    With diffusers' SD defaults: first order at the first and the last step ("lower_order_final"), final sigma 0.
    Deterministic: the generator is unused.
    """
    sigmas, n = levels.sigmas, len(levels.timesteps)
    x = x_t
    prev_pred_x0 = lambda_prev = None  # the multistep memory: the previous step's data prediction and lambda
    for i in trange(n, disable=not progress, desc="sampling (dpmpp2m)"):
        t = levels.timesteps[i]
        eps = predict_noise(x, t)
        alpha_s, sigma_s, lambda_s = vp_coefficients(sigmas[i])
        alpha_t, sigma_t, lambda_t = vp_coefficients(sigmas[i + 1])
        pred_x0 = (x - sigma_s * eps) / alpha_s  # data prediction x_theta, Lu et al. 2022, eq. 4
        h = lambda_t - lambda_s
        if prev_pred_x0 is None or i == n - 1:
            D = pred_x0  # first order: DPM-Solver++(1), the same as DDIM
        else:
            r = (lambda_s - lambda_prev) / h  # r_i = h_{i-1} / h_i
            D = pred_x0 + (1 / (2 * r)) * (pred_x0 - prev_pred_x0)  # D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
        x_next = (sigma_t / sigma_s) * x.float() - (alpha_t * (torch.exp(-h) - 1.0)) * D  # Algorithm 2, line 6
        if callback is not None:
            callback(i, t.item(), x, pred_x0)
        x, prev_pred_x0, lambda_prev = x_next.to(eps.dtype), pred_x0, lambda_s
    return x


def sample_lcm(predict_noise: NoisePredictor, x_t: torch.Tensor, levels: NoiseLevels, *,
               generator: torch.Generator | None = None, callback: StepCallback | None = None,
               progress: bool = False) -> torch.Tensor:
    """Multistep latent consistency sampling, Luo et al. 2023, Algorithm 3 (diffusers' LCMScheduler).

    Each step maps x_t straight to a clean estimate with the consistency function, then noises that estimate to the
    next timestep with fresh noise (eq. 4 of Ho et al. 2020); the last step returns the estimate itself.
    Made for a UNet distilled into a consistency model (an LCM, or SD with an LCM-LoRA). Without one, each jump
    lands on the UNet's one-step guess of x_0, an average over the pictures the noise could become: blurred for
    SD v1.5, nearly right for the shipped small model, whose captions fix the picture (README, LCM-LoRA).
    """
    x, n = x_t, len(levels.timesteps)
    for i in trange(n, disable=not progress, desc="sampling (lcm)"):
        t = levels.timesteps[i]
        eps = predict_noise(x, t)
        c_skip, c_out = consistency_scalings(t)
        denoised = c_skip * x + c_out * predict_x0(x, eps, levels.alpha_bars[i])  # f(x_t, t), Luo et al. sec. 4.1
        if i < n - 1:  # Algorithm 3: z ~ N(0, I), x_next = sqrt(alpha_bar_next) f + sqrt(1 - alpha_bar_next) z
            noise = randn(eps.shape, generator, denoised.dtype, eps.device)
            x_next = q_sample(denoised, noise, levels.alpha_bars[i + 1])
        else:
            x_next = denoised  # no noise after the last step (nor in a one-step run)
        if callback is not None:
            callback(i, t.item(), x, denoised)
        x = x_next
    return x


# The sampler names a `sampler` argument may take, and the loop each one runs.
SAMPLING_LOOPS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler,
                  "euler_a": sample_euler_ancestral, "dpmpp2m": sample_dpmpp_2m, "lcm": sample_lcm}
SAMPLERS = tuple(SAMPLING_LOOPS)
