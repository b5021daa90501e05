"""The exercise checks of the σ-view notebook: the references are what sd and diffusers compute, mistakes are named.

The Euler step's reference, run in a loop on Karras sigmas with a toy noise predictor, must give what
`sd.DiffusionScheduler().sample(..., sampler="euler", use_karras_sigmas=True)` gives; the Karras sigmas' reference
must be diffusers' EulerDiscreteScheduler's, configured like SD v1.5.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sd.course.checks import check_euler_step, check_karras_sigmas, pick
from sd.course.checks.sigma import reference_euler_step, reference_karras_sigmas
from sd.diffusion import DiffusionScheduler
from tests.check_helpers import rejects

STEPS = 12


def _sd_euler(use_karras_sigmas: bool) -> EulerDiscreteScheduler:
    """diffusers' Euler with SD v1.5's scheduler config (scaled-linear betas, leading spacing, offset 1)."""
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                                  use_karras_sigmas=use_karras_sigmas)


def toy_unet(x, context, t):
    """A noise predictor that depends on x only (so the fractional timesteps need not match)."""
    return torch.tanh(x) * 0.8 + 0.1 * context.mean()


def test_reference_karras_sigmas_are_diffusers():
    scheduler = _sd_euler(use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    sigmas = DiffusionScheduler().sigmas
    # diffusers takes sigma_min and sigma_max from the run's own (leading) timesteps: 1 and 1 + 11 * (1000 // 12)
    lo, hi = sigmas[1].item(), sigmas[1 + (STEPS - 1) * (1000 // STEPS)].item()
    ours = reference_karras_sigmas(lo, hi, STEPS)
    torch.testing.assert_close(ours.float(), scheduler.sigmas[:-1], atol=1e-5, rtol=1e-5)
    assert ours[0] == pytest.approx(hi) and ours[-1] == pytest.approx(lo)


def test_reference_euler_step_on_karras_sigmas_is_sd_euler_sampling():
    """The reference step in a loop (x_T = sigma_max * noise, the UNet sees x / sqrt(1 + sigma^2)) = sd's sample."""
    torch.manual_seed(0)
    noise, context = torch.randn(1, 4, 6, 6), torch.randn(1, 77, 8)
    out = DiffusionScheduler().sample(toy_unet, context, latents=noise, num_inference_steps=STEPS, sampler="euler",
                                      use_karras_sigmas=True, progress=False)
    scheduler = _sd_euler(use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    sigmas = torch.cat([reference_karras_sigmas(scheduler.sigmas[-2].item(), scheduler.sigmas[0].item(), STEPS),
                        torch.zeros(1, dtype=torch.float64)]).float()
    x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    for i in range(STEPS):
        eps = toy_unet(x / (sigmas[i] ** 2 + 1) ** 0.5, context, None)
        x = reference_euler_step(x, eps, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, out, atol=1e-5, rtol=1e-5)


def test_reference_euler_step_is_diffusers_euler_step():
    scheduler = _sd_euler(use_karras_sigmas=False)
    scheduler.set_timesteps(STEPS)
    x, eps = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    t = scheduler.timesteps[3]
    expected = scheduler.step(eps, t, x).prev_sample
    got = reference_euler_step(x, eps, scheduler.sigmas[3], scheduler.sigmas[4])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

def my_euler_step(x, eps, sigma, sigma_next):
    return x + (sigma_next - sigma) * eps          # d = (x - (x - sigma eps)) / sigma = eps


def my_karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """A Python loop in floats, returning a list: the check accepts it."""
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


def my_karras_sigmas_float32(sigma_min, sigma_max, n, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_euler_step(reference_euler_step) and check_euler_step(my_euler_step)
    assert check_karras_sigmas(reference_karras_sigmas) and check_karras_sigmas(my_karras_sigmas)
    assert check_karras_sigmas(my_karras_sigmas_float32)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Done wrong
# ---------------------------------------------------------------------------------------------------------

def euler_wrong_sign(x, eps, sigma, sigma_next):
    return x + (sigma - sigma_next) * eps


def euler_derivative_over_sigma(x, eps, sigma, sigma_next):
    x0 = x - sigma * eps
    d = (x - x0) / sigma ** 2
    return x + (sigma_next - sigma) * d


def euler_returns_denoised(x, eps, sigma, sigma_next):
    return x - sigma * eps


def euler_rescaled_like_ddim(x, eps, sigma, sigma_next):
    return (x + (sigma_next - sigma) * eps) / math.sqrt(1 + float(sigma_next) ** 2)


@pytest.mark.parametrize("impl, mistake", [
    (euler_wrong_sign, "the step goes the wrong way"),
    (euler_derivative_over_sigma, "divided by sigma once too often"),
    (euler_returns_denoised, "this is the denoised"),
    (euler_rescaled_like_ddim, "scaled back to the variance-preserving"),
])
def test_check_euler_step_names_the_mistake(impl, mistake):
    rejects(check_euler_step, impl, "check_euler_step failed", "Hint: ", mistake)


def karras_ascending(sigma_min, sigma_max, n, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def karras_rho_swapped(sigma_min, sigma_max, n, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** rho + ramp * (sigma_min ** rho - sigma_max ** rho)) ** (1 / rho)


def karras_linear(sigma_min, sigma_max, n, rho=7.0):
    return torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)


def karras_log_linear(sigma_min, sigma_max, n, rho=7.0):
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64)


def karras_rho_hard_coded(sigma_min, sigma_max, n, rho=7.0):
    return reference_karras_sigmas(sigma_min, sigma_max, n, 7.0)


@pytest.mark.parametrize("impl, mistake", [
    (karras_ascending, "increasing order"),
    (karras_rho_swapped, "rho and 1/rho are swapped"),
    (karras_linear, "evenly spaced in sigma (that is rho = 1)"),
    (karras_log_linear, "evenly spaced in log(sigma)"),
    (karras_rho_hard_coded, "rho is fixed at 7"),
])
def test_check_karras_sigmas_names_the_mistake(impl, mistake):
    rejects(check_karras_sigmas, impl, "check_karras_sigmas failed", mistake)


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(x, eps, sigma, sigma_next):
        raise NotImplementedError("Exercise: the Euler step")

    assert pick(check_euler_step, stub, reference=reference_euler_step) is reference_euler_step
    assert "not done yet" in capsys.readouterr().out
