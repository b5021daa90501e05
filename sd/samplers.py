"""The five samplers: one small update rule each, and the per-run schedule it walks along.

A sampler turns the UNet's noise prediction eps at x_t into the next, less noisy latent.
Two families share this file:

- variance-preserving samplers (DDPM, DDIM, DPM-Solver++) work with alpha_bar_t directly:
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
- Euler-type samplers (Euler, Euler ancestral) work with Karras et al.'s noise level
  sigma = sqrt((1 - alpha_bar) / alpha_bar) and the unscaled latent x = x_0 + sigma eps,
  which is x_t * sqrt(1 + sigma^2); the UNet still wants x_t, so its input is divided back.

Each `*_step` function is the update rule on its own (what the notebooks show); each `*Sampler`
class precomputes, once per run, the timesteps and schedule values its rule needs, and gives the
same numbers as the corresponding diffusers scheduler configured like SD v1.5.
"""
from __future__ import annotations

import torch

# SD v1's inference timesteps are shifted by one ("steps_offset": 1 in its scheduler config):
# 50 steps visit 981, 961, ..., 1 instead of 980, ..., 0.
STEPS_OFFSET = 1
# Karras et al. 2022, eq. 5: rho = 7 spaces the noise levels densely near sigma_min.
KARRAS_RHO = 7.0
# Floor on the DDPM posterior variance (diffusers clamps it so that its square root stays finite).
MIN_DDPM_VARIANCE = 1e-20

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp2m")


def randn(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's device (CPU) and moved, as diffusers does."""
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """SD's "leading" spacing: 0, k, 2k, ... with k = T // n, reversed, plus the offset (50 -> 981, ..., 1)."""
    step_ratio = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.int64) * step_ratio + STEPS_OFFSET


# ---------------------------------------------------------------------------------------------
# The update rules
# ---------------------------------------------------------------------------------------------

def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_0 implied by the predicted noise: invert x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5  # Ho et al. 2020, eq. 15


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


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, Karras et al. 2022, Alg. 1.

    x is the unscaled latent x_0 + sigma * noise. Returns (x_next, predicted x_0).
    """
    pred_x0 = x - sigma * eps  # the denoiser D(x; sigma)
    d = (x - pred_x0) / sigma  # dx/dsigma, Karras et al. 2022, eq. 3 with sigma(t) = t
    return x + d * (sigma_next - sigma), pred_x0


def euler_ancestral_step(x, eps, sigma, sigma_next, noise):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion, Crowson 2022).

    sigma_up^2 + sigma_down^2 = sigma_next^2, with sigma_up the ancestral (DDPM, eta=1) noise of the jump
    sigma -> sigma_next, Song et al. 2021, eq. 16 written in sigmas. Returns (x_next, predicted x_0).
    """
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    pred_x0 = x - sigma * eps
    d = (x - pred_x0) / sigma
    return x + d * (sigma_down - sigma) + noise * sigma_up, pred_x0


def vp_coefficients(sigma):
    """Karras' sigma -> variance-preserving alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar), and lambda_t."""
    alpha_t = 1 / (sigma ** 2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # half the log-SNR; +inf where sigma = 0
    return alpha_t, sigma_t, lambda_t


def dpmpp_2m_step(x_s, pred_x0, sigma, sigma_next, prev_pred_x0=None, sigma_prev=None):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: a multistep solver in lambda = log(alpha_t / sigma_t).

    x_s is the variance-preserving latent at noise level sigma; pred_x0 its data prediction.
    Without the previous step's prediction it is the first-order step (DPM-Solver++(1), the same as DDIM).
    Returns the latent at sigma_next.
    """
    alpha_s, sigma_s, lambda_s = vp_coefficients(sigma)
    alpha_t, sigma_t, lambda_t = vp_coefficients(sigma_next)
    h = lambda_t - lambda_s
    if prev_pred_x0 is None:
        D = pred_x0  # first order
    else:
        _, _, lambda_prev = vp_coefficients(sigma_prev)
        r = (lambda_s - lambda_prev) / h  # r_i = h_{i-1} / h_i
        D = pred_x0 + (1 / (2 * r)) * (pred_x0 - prev_pred_x0)  # D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
    return (sigma_t / sigma_s) * x_s - (alpha_t * (torch.exp(-h) - 1.0)) * D


# ---------------------------------------------------------------------------------------------
# Per-run schedules: what each rule needs at step i, computed once
# ---------------------------------------------------------------------------------------------

class _VPSampler:
    """Shared by DDPM and DDIM: timesteps and alpha_bar at each step; the latent is x_t itself."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I)

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int):
        self.timesteps = leading_timesteps(num_inference_steps, len(alphas_cumprod))  # (n,) int64
        self.alpha_bar = alphas_cumprod[self.timesteps]  # (n,)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet sees x_t unchanged."""
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """q(x_t | x_0) at the i-th timestep, Ho et al. 2020, eq. 4 (the start of image-to-image)."""
        alpha_bar_t = self.alpha_bar[i].to(device=x0.device, dtype=x0.dtype)
        return alpha_bar_t ** 0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


class DDPMSampler(_VPSampler):
    """Ancestral sampling, Ho et al. 2020, on SD's timesteps; fresh noise at every step with t > 0."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int):
        super().__init__(alphas_cumprod, num_inference_steps)
        # the step after the last one lands on x_0 itself: alpha_bar = 1
        self.alpha_bar_prev = torch.cat([self.alpha_bar[1:], torch.ones(1)])
        self.draws_noise = (self.timesteps > 0).tolist()

    def step(self, i: int, x_t, eps, generator=None):
        """x_t -> (x_prev, predicted x_0)."""
        noise = randn(eps.shape, generator, eps.dtype, eps.device) if self.draws_noise[i] else torch.zeros_like(eps)
        return ddpm_step(x_t, eps, self.alpha_bar[i], self.alpha_bar_prev[i], noise)


class DDIMSampler(_VPSampler):
    """DDIM, Song et al. 2021; SD's last step goes to alpha_bar_0, not 1 ("set_alpha_to_one": false)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int, eta: float = 0.0):
        super().__init__(alphas_cumprod, num_inference_steps)
        prev_t = self.timesteps - len(alphas_cumprod) // num_inference_steps
        self.alpha_bar_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], alphas_cumprod[0])
        self.eta = float(eta)

    def step(self, i: int, x_t, eps, generator=None):
        """x_t -> (x_prev, predicted x_0); draws noise only when eta > 0."""
        noise = randn(eps.shape, generator, eps.dtype, eps.device) if self.eta > 0 else None
        return ddim_step(x_t, eps, self.alpha_bar[i], self.alpha_bar_prev[i], self.eta, noise)


class DPMSolverPP2MSampler(_VPSampler):
    """DPM-Solver++(2M), Lu et al. 2022, with diffusers' SD defaults: first-order first and last steps, final sigma 0.

    Its "leading" spacing divides T into n + 1 parts and drops t = 0 (diffusers' DPMSolverMultistepScheduler):
    50 steps visit 951, 932, ..., 20.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int):
        num_train_timesteps = len(alphas_cumprod)
        step_ratio = num_train_timesteps // (num_inference_steps + 1)
        self.timesteps = torch.arange(num_inference_steps, 0, -1, dtype=torch.int64) * step_ratio + STEPS_OFFSET
        self.alpha_bar = alphas_cumprod[self.timesteps]
        train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = torch.cat([train_sigmas[self.timesteps], torch.zeros(1)])  # (n + 1,), ends at sigma = 0
        self.num_steps = num_inference_steps
        self.prev_pred_x0 = None  # the multistep memory

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """q(x_t | x_0) written as alpha_t x_0 + sigma_t noise; starting here resets the multistep memory."""
        alpha_t, sigma_t, _ = vp_coefficients(self.sigmas[i].to(device=x0.device, dtype=x0.dtype))
        self.prev_pred_x0 = None
        return alpha_t * x0 + sigma_t * noise

    def step(self, i: int, x_t, eps, generator=None):
        """x_t -> (x_next, predicted x_0); remembers predicted x_0 for the next step's second-order correction."""
        sigma = self.sigmas[i]
        alpha_s, sigma_s, _ = vp_coefficients(sigma)
        pred_x0 = (x_t - sigma_s * eps) / alpha_s  # data prediction, Lu et al. 2022, eq. 4 (x_theta)
        last = i == self.num_steps - 1  # the final step is first order ("lower_order_final")
        prev = None if last else self.prev_pred_x0
        x_next = dpmpp_2m_step(x_t.float(), pred_x0, sigma, self.sigmas[i + 1], prev,
                               self.sigmas[i - 1] if i > 0 else None)
        self.prev_pred_x0 = pred_x0
        return x_next.to(eps.dtype), pred_x0


class EulerSampler:
    """Euler on Karras et al.'s ODE, on SD's timesteps or (use_karras_sigmas) Karras et al.'s noise levels."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int, use_karras_sigmas: bool = False):
        timesteps = leading_timesteps(num_inference_steps, len(alphas_cumprod))
        train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,) float32, growing with t
        sigmas = train_sigmas[timesteps]
        if use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, train_sigmas)  # fractional timesteps for the UNet
        self.timesteps = timesteps.to(torch.float32)  # the UNet gets the (float) timestep, as in diffusers
        self.sigmas = torch.cat([sigmas.to(torch.float32), torch.zeros(1)])  # (n + 1,), ends at sigma = 0
        # x_T = sigma_max * noise in the unscaled latent, i.e. x_t * sqrt(1 + sigma^2) for x_t ~ N(0, I)
        self.init_noise_sigma = (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet was trained on x_t = x / sqrt(1 + sigma^2)."""
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x = x_0 + sigma noise at the i-th noise level (the start of image-to-image)."""
        return x0 + noise * self.sigmas[i].to(device=x0.device, dtype=x0.dtype)

    def step(self, i: int, x, eps, generator=None):
        """x at sigma_i -> (x at sigma_{i+1}, predicted x_0)."""
        x_next, pred_x0 = euler_step(x.float(), eps, self.sigmas[i], self.sigmas[i + 1])
        return x_next.to(eps.dtype), pred_x0


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral on SD's timesteps: fresh noise at every step (none is added after the last)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int):
        super().__init__(alphas_cumprod, num_inference_steps)

    def step(self, i: int, x, eps, generator=None):
        """x at sigma_i -> (x at sigma_{i+1}, predicted x_0)."""
        noise = randn(eps.shape, generator, eps.dtype, eps.device)
        x_next, pred_x0 = euler_ancestral_step(x.float(), eps, self.sigmas[i], self.sigmas[i + 1], noise)
        return x_next.to(eps.dtype), pred_x0


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


def make_sampler(name: str, alphas_cumprod: torch.Tensor, num_inference_steps: int, *,
                 eta: float = 0.0, use_karras_sigmas: bool = False):
    """The sampler called `name` (one of SAMPLERS), set up for a run of num_inference_steps steps."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta applies to sampler='ddim' only, got eta={eta} with sampler={name!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if use_karras_sigmas and name != "euler":
        raise ValueError(f"use_karras_sigmas applies to sampler='euler' only, got sampler={name!r}")
    if name == "ddpm":
        return DDPMSampler(alphas_cumprod, num_inference_steps)
    if name == "ddim":
        return DDIMSampler(alphas_cumprod, num_inference_steps, eta)
    if name == "euler":
        return EulerSampler(alphas_cumprod, num_inference_steps, use_karras_sigmas)
    if name == "euler_a":
        return EulerAncestralSampler(alphas_cumprod, num_inference_steps)
    return DPMSolverPP2MSampler(alphas_cumprod, num_inference_steps)
