"""Checks for notebook 06 (forward diffusion): SD's noise schedule, and `add_noise`, q(x_t | x_0) in closed form.

Each check compares with `sd.diffusion.DiffusionScheduler`; the `Mistake`s below recompute the reference the
typical wrong ways (linear instead of scaled-linear betas, no cumulative product, alpha_bar at t-1 or t+1,
sqrt(beta_t) instead of sqrt(1 - alpha_bar_t), ...), so a wrong answer is named, not just reported.
"""
from __future__ import annotations

import torch

from ...diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, DiffusionScheduler
from .common import Case, Mistake, check_function, randn, seeded

# DDPM's own schedule (Ho et al. 2020, sec. 4): linear betas from 1e-4 to 0.02; a second schedule for the checks.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02

# ----------------------------------------------------------------------------------------------------------
# Exercise 6.1: the schedule
# ----------------------------------------------------------------------------------------------------------


def reference_schedule(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                       beta_end: float = BETA_END) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) of sd.diffusion.DiffusionScheduler, with exercise 6.1's signature."""
    s = DiffusionScheduler(num_train_timesteps, beta_start, beta_end)
    return s.betas, s.alphas, s.alphas_cumprod


def _schedule(n: int, beta_start: float, beta_end: float, betas: str = "scaled_linear",
              cumulative: str = "cumprod"):
    """The schedule with the betas or the cumulative product done a chosen (wrong) way."""
    if betas == "scaled_linear":
        b = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif betas == "linear":
        b = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    else:   # "sqrt": linear in sqrt(beta), never squared
        b = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32)
    a = 1 - b
    ab = {"cumprod": lambda: torch.cumprod(a, 0),
          "none": lambda: a,
          "of_betas": lambda: torch.cumprod(b, 0),
          "exclusive": lambda: torch.cat([torch.ones(1), torch.cumprod(a, 0)[:-1]]),
          "cumsum": lambda: 1 - torch.cumsum(b, 0)}[cumulative]()
    return b, a, ab


def check_schedule(fn) -> bool:
    """Exercise 6.1: fn(num_train_timesteps, beta_start, beta_end) -> (betas, alphas, alphas_cumprod), each (T,)."""
    cases = [Case({"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": BETA_START, "beta_end": BETA_END}),
             Case({"num_train_timesteps": 10, "beta_start": DDPM_BETA_START, "beta_end": DDPM_BETA_END}),
             Case({"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.05})]

    def wrong(**how):
        return lambda ref, c: _schedule(*c.inputs.values(), **how)

    mistakes = [
        Mistake("the betas are linear from beta_start to beta_end: SD's are 'scaled linear', linear in sqrt(beta): "
                "torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2", wrong(betas="linear")),
        Mistake("the betas are linear from beta_start to beta_end (and alphas_cumprod follows them): SD's are "
                "'scaled linear', torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2",
                wrong(betas="linear", cumulative="none")),
        Mistake("the betas are the square roots: linspace(sqrt(beta_start), sqrt(beta_end), T) must then be "
                "squared, ** 2", wrong(betas="sqrt")),
        Mistake("alphas_cumprod is not a cumulative product: alpha_bar_t = alpha_0 * alpha_1 * ... * alpha_t, "
                "torch.cumprod(alphas, dim=0)", wrong(cumulative="none")),
        Mistake("alphas_cumprod multiplies the betas: alpha_bar_t is the product of the alphas = 1 - betas, "
                "torch.cumprod(alphas, dim=0)", wrong(cumulative="of_betas")),
        Mistake("alphas_cumprod is shifted by one step (it starts at 1): alpha_bar_t includes alpha_t itself, "
                "alpha_bar_0 = alpha_0 = 1 - beta_0; torch.cumprod(alphas, dim=0)", wrong(cumulative="exclusive")),
        Mistake("alphas_cumprod is 1 - cumsum(betas), only a first-order approximation: take the product "
                "torch.cumprod(1 - betas, dim=0)", wrong(cumulative="cumsum")),
    ]
    return check_function("check_schedule", fn, reference_schedule, cases, mistakes,
                          hint="betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2; "
                               "alphas = 1 - betas; alphas_cumprod = torch.cumprod(alphas, dim=0); return the three")


# ----------------------------------------------------------------------------------------------------------
# Exercise 6.2: add_noise, q(x_t | x_0) in closed form
# ----------------------------------------------------------------------------------------------------------


def reference_add_noise(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sd.diffusion.DiffusionScheduler.add_noise on the schedule with this alpha_bar (exercise 6.2's signature)."""
    s = DiffusionScheduler(num_train_timesteps=len(alphas_cumprod))
    s.alphas_cumprod = alphas_cumprod
    return s.add_noise(x0, noise, t)


def _noised(x0, noise, t, alphas_cumprod, shift: int = 0, signal: str = "sqrt_ab", noise_coef: str = "sqrt_1m_ab",
            reshape: bool = True):
    """signal_coef * x0 + noise_coef * noise with the coefficients (and the alpha_bar index) chosen."""
    t = torch.as_tensor(t)
    ab = alphas_cumprod[t + shift]                                   # IndexError for t + 1 = T: mistake skipped
    ab_prev = torch.where(t + shift > 0, alphas_cumprod[(t + shift - 1).clamp(min=0)], torch.ones(()))
    alpha = ab / ab_prev                                             # alpha_t = alpha_bar_t / alpha_bar_{t-1}
    coefs = {"sqrt_ab": ab.sqrt(), "ab": ab, "sqrt_1m_ab": (1 - ab).sqrt(), "1m_ab": 1 - ab,
             "sqrt_beta": (1 - alpha).sqrt(), "sqrt_alpha": alpha.sqrt()}
    s, n = coefs[signal], coefs[noise_coef]
    if reshape:
        s, n = s.reshape(-1, *[1] * (x0.dim() - 1)), n.reshape(-1, *[1] * (x0.dim() - 1))
    return s * x0 + n * noise


def check_add_noise(fn) -> bool:
    """Exercise 6.2: fn(x0, noise, t, alphas_cumprod) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    sd_schedule = DiffusionScheduler().alphas_cumprod
    ddpm_schedule = DiffusionScheduler(100, DDPM_BETA_START, DDPM_BETA_END).alphas_cumprod
    with seeded(50):
        # the first case has batch 4 = width 4: one alpha_bar per sample, if not reshaped to (B, 1, 1, 1),
        # silently broadcasts along the width, so the mistake gives numbers (and a name), not a crash
        cases = [Case({"x0": randn(4, 3, 5, 4), "noise": randn(4, 3, 5, 4), "t": torch.tensor([0, 10, 500, 998]),
                       "alphas_cumprod": sd_schedule}),
                 Case({"x0": randn(2, 4, 8, 8), "noise": randn(2, 4, 8, 8), "t": torch.tensor([999, 250]),
                       "alphas_cumprod": sd_schedule}),
                 Case({"x0": randn(1, 3, 6, 6), "noise": randn(1, 3, 6, 6), "t": 300, "alphas_cumprod": sd_schedule}),
                 Case({"x0": randn(3, 2, 4, 4), "noise": randn(3, 2, 4, 4), "t": torch.tensor([5, 50, 99]),
                       "alphas_cumprod": ddpm_schedule})]

    def wrong(**how):
        return lambda ref, c: _noised(*c.inputs.values(), **how)

    mistakes = [
        Mistake("alpha_bar is taken at t - 1: use alphas_cumprod[t] (index t is the t-th noising step, "
                "counted from 0)", wrong(shift=-1)),
        Mistake("alpha_bar is taken at t + 1: use alphas_cumprod[t] (index t is the t-th noising step, "
                "counted from 0)", wrong(shift=1)),
        Mistake("the noise is scaled by sqrt(beta_t): that is one step's noise; after t steps it is "
                "sqrt(1 - alpha_bar_t) * noise", wrong(noise_coef="sqrt_beta")),
        Mistake("this is one step, q(x_t | x_{t-1}) = sqrt(alpha_t) x + sqrt(beta_t) noise: the closed form "
                "from x_0 uses alpha_bar_t, sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise",
                wrong(signal="sqrt_alpha", noise_coef="sqrt_beta")),
        Mistake("the square roots are missing: sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise "
                "(the variances add up to 1, the coefficients are their square roots)",
                wrong(signal="ab", noise_coef="1m_ab")),
        Mistake("the noise is scaled by 1 - alpha_bar_t, the variance: scale it by the standard deviation "
                "sqrt(1 - alpha_bar_t)", wrong(noise_coef="1m_ab")),
        Mistake("the signal is scaled by alpha_bar_t: scale it by sqrt(alpha_bar_t)", wrong(signal="ab")),
        Mistake("the coefficients are swapped: the image gets sqrt(alpha_bar_t) (close to 1 at small t), the "
                "noise sqrt(1 - alpha_bar_t)", wrong(signal="sqrt_1m_ab", noise_coef="sqrt_ab")),
        Mistake("alpha_bar_t (one per sample, shape (B,)) is not reshaped to (B, 1, 1, 1), so it broadcasts along "
                "the last dimension, the width: alphas_cumprod[t].view(-1, 1, 1, 1)", wrong(reshape=False)),
    ]
    return check_function("check_add_noise", fn, reference_add_noise, cases, mistakes,
                          hint="alpha_bar_t = alphas_cumprod[t] reshaped to (B, 1, 1, 1) (t is an int or a (B,) "
                               "tensor); return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise")
