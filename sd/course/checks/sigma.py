"""Checks for the σ-view notebook: the Euler step of the probability-flow ODE, and Karras et al.'s noise levels.

The references are written here, after Karras et al. 2022 (Algorithm 1's Euler step, eq. 5's noise levels);
tests/test_checks_sigma.py proves that they are what `sd.DiffusionScheduler().sample(..., sampler="euler")`
and diffusers' EulerDiscreteScheduler compute. The `Mistake`s recompute them the typical wrong ways (the step's
sign flipped, the derivative divided by sigma once more, the levels in the wrong order, rho where 1/rho
belongs, ...), so a wrong answer is named, not just reported.
"""
from __future__ import annotations

import torch

from ...diffusion import DiffusionScheduler
from .common import Case, Mistake, check_function, randn, seeded

# Karras et al. 2022, eq. 5 and sec. 3: rho = 7 puts more of the steps at low noise.
KARRAS_RHO = 7.0
# SD v1's noise levels, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): 0.0292 at t = 0, 14.61 at t = 999.
_SIGMAS = DiffusionScheduler().sigmas


# ----------------------------------------------------------------------------------------------------------
# Exercise: the Euler step
# ----------------------------------------------------------------------------------------------------------

def reference_euler_step(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                         sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dsigma = (x - D(x; sigma)) / sigma from sigma to sigma_next, Karras et al. 2022, Alg. 1."""
    denoised = x - sigma * eps              # D(x; sigma): the predicted x_0
    d = (x - denoised) / sigma              # dx/dsigma, eq. 3 with sigma(t) = t and s(t) = 1
    return x + (sigma_next - sigma) * d


def _euler_cases() -> list[Case]:
    """x = x_0 + sigma * noise at three noise levels of SD's schedule, the last step ending at sigma = 0."""
    pairs = ((_SIGMAS[999], _SIGMAS[949]), (_SIGMAS[500], _SIGMAS[450]), (_SIGMAS[0], torch.tensor(0.0)))
    cases = []
    with seeded(60):
        for j, (sigma, sigma_next) in enumerate(pairs):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 3, 8, 8)
            x = randn(*shape) * (1 + sigma ** 2) ** 0.5
            cases.append(Case({"x": x, "eps": randn(*shape), "sigma": sigma.clone(), "sigma_next": sigma_next.clone()}))
    return cases


def check_euler_step(fn) -> bool:
    """fn(x, eps, sigma, sigma_next) -> x at sigma_next: x is x_0 + sigma * noise, eps the model's noise."""
    def wrong(kind):
        def compute(ref, c):
            x, eps, sigma, sigma_next = c.inputs.values()
            return {"sign": x + (sigma - sigma_next) * eps,
                    "over_sigma": x + (sigma_next - sigma) * eps / sigma,
                    "times_sigma": x + (sigma_next - sigma) * eps * sigma,
                    "squares": x + (sigma_next ** 2 - sigma ** 2) * eps,
                    "denoised": x - sigma * eps,
                    "only_next": x + sigma_next * eps,
                    "vp_scaled": (x - (sigma - sigma_next) * eps) / (1 + sigma_next ** 2) ** 0.5}[kind]
        return compute

    mistakes = [
        Mistake("the step goes the wrong way: x moves by (sigma_next - sigma) * d, and sigma_next < sigma, so "
                "the noise is taken out", wrong("sign")),
        Mistake("the derivative is divided by sigma once too often: d = (x - D) / sigma with D = x - sigma * eps "
                "is eps itself", wrong("over_sigma")),
        Mistake("the derivative is multiplied by sigma: d = (x - D) / sigma = eps", wrong("times_sigma")),
        Mistake("the step is taken in sigma^2 (a variance): the ODE is written in sigma, x + (sigma_next - sigma) * d",
                wrong("squares")),
        Mistake("this is the denoised D(x; sigma) = x - sigma * eps (the predicted x_0): the step goes only to "
                "sigma_next, x + (sigma_next - sigma) * d", wrong("denoised")),
        Mistake("the step adds sigma_next * eps to x: it moves by the difference, x + (sigma_next - sigma) * d",
                wrong("only_next")),
        Mistake("the result is scaled back to the variance-preserving x_t: in the sigma view x = x_0 + sigma * "
                "noise is not rescaled (only the UNet's input is, outside the step)", wrong("vp_scaled")),
    ]
    return check_function("check_euler_step", fn, reference_euler_step, _euler_cases(), mistakes,
                          hint="denoised = x - sigma * eps; d = (x - denoised) / sigma; "
                               "return x + (sigma_next - sigma) * d",
                          reference_name="Karras et al. 2022, Algorithm 1 (reference_euler_step)")


# ----------------------------------------------------------------------------------------------------------
# Exercise: Karras et al.'s noise levels
# ----------------------------------------------------------------------------------------------------------

def reference_karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho), Karras et al. 2022, eq. 5."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)          # i / (N - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _as_float64(fn):
    """fn with its output as a float64 tensor: float32 or a list of numbers is fine for the check."""
    def call(*args):
        out = fn(*args)
        try:
            return torch.as_tensor(out).to(torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return out
    call.__name__, call.__qualname__, call.__module__ = (getattr(fn, "__name__", "fn"), getattr(fn, "__qualname__", "fn"),
                                                         getattr(fn, "__module__", "?"))
    return call


def check_karras_sigmas(fn) -> bool:
    """fn(sigma_min, sigma_max, n, rho) -> (n,) noise levels, sigma_max first, Karras et al. 2022, eq. 5."""
    cases = [Case({"sigma_min": float(_SIGMAS[0]), "sigma_max": float(_SIGMAS[-1]), "n": 10, "rho": KARRAS_RHO}),
             Case({"sigma_min": 0.002, "sigma_max": 80.0, "n": 18, "rho": KARRAS_RHO}),     # Karras' own range
             Case({"sigma_min": float(_SIGMAS[0]), "sigma_max": float(_SIGMAS[-1]), "n": 25, "rho": 3.0})]

    def wrong(kind):
        def compute(ref, c):
            lo, hi, n, rho = c.inputs.values()
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            return {"ascending": reference_karras_sigmas(lo, hi, n, rho).flip(0),
                    "inverted_rho": (hi ** rho + ramp * (lo ** rho - hi ** rho)) ** (1 / rho),
                    "no_power": hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho)),
                    "linear": hi + ramp * (lo - hi),
                    "log_linear": torch.exp(torch.log(torch.tensor(hi, dtype=torch.float64))
                                            + ramp * (torch.log(torch.tensor(lo, dtype=torch.float64))
                                                      - torch.log(torch.tensor(hi, dtype=torch.float64)))),
                    "seven": reference_karras_sigmas(lo, hi, n, KARRAS_RHO),
                    "n_plus_one": reference_karras_sigmas(lo, hi, n + 1, rho)[:n]}[kind]
        return compute

    mistakes = [
        Mistake("the levels are in increasing order: a run starts at sigma_max (the noisiest) and ends at "
                "sigma_min", wrong("ascending")),
        Mistake("rho and 1/rho are swapped: space the levels evenly in sigma^(1/rho), then raise to the power rho",
                wrong("inverted_rho")),
        Mistake("the final power rho is missing: these are the evenly spaced sigma^(1/rho) values themselves",
                wrong("no_power")),
        Mistake("the levels are evenly spaced in sigma (that is rho = 1): space them in sigma^(1/rho)",
                wrong("linear")),
        Mistake("the levels are evenly spaced in log(sigma) (the limit rho -> infinity): space them in "
                "sigma^(1/rho)", wrong("log_linear")),
        Mistake("rho is fixed at 7: use the rho given", wrong("seven")),
        Mistake("the ramp has n + 1 points: i / (n - 1) for i = 0, ..., n - 1 ends exactly at sigma_min",
                wrong("n_plus_one")),
    ]
    return check_function("check_karras_sigmas", _as_float64(fn), reference_karras_sigmas, cases, mistakes,
                          hint="ramp = torch.linspace(0, 1, n); (sigma_max^(1/rho) + ramp * (sigma_min^(1/rho) - "
                               "sigma_max^(1/rho)))^rho",
                          reference_name="Karras et al. 2022, eq. 5 (reference_karras_sigmas)")
