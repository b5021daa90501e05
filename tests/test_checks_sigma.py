"""The exercise checks of the σ-view notebook: the references are what sd and diffusers compute, they converge at
their order where the exact answer is known, and mistakes are named in words.

The Euler and DPM-Solver++(2M) references must give what sd.samplers' loops give on the same levels; Heun's must be
diffusers' HeunDiscreteScheduler's; the Karras sigmas' must be diffusers' EulerDiscreteScheduler's, configured like
SD v1.5; on data N(0, s^2), whose ODE has a closed-form solution, Euler's error must halve per doubling of the
steps and Heun's and DPM-Solver++(2M)'s must quarter.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sd.course.checks import (check_dpmpp_2m_sampler, check_error_curve, check_euler_sampler, check_heun_sampler,
                              check_karras_sigmas, pick)
from sd.course.checks.sigma import (DATA_STD, gaussian_eps, reference_dpmpp_2m_sample, reference_error_curve,
                                    reference_euler_sample, reference_heun_sample, reference_karras_sigmas)
from sd.diffusion import DiffusionScheduler
from sd.samplers import NoiseLevels, sample_dpmpp_2m, sample_euler
from tests.check_helpers import program_text, rejects, rejects_unrecognised

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


def _levels_for_sd(sigmas: torch.Tensor) -> NoiseLevels:
    """sigmas as sd.samplers' NoiseLevels; the 'timestep' of level i is i, so a toy predictor can look sigma up."""
    return NoiseLevels(torch.arange(len(sigmas) - 1), 1 / (1 + sigmas ** 2), sigmas)


def _sd_predictor(predict_eps, sigmas):
    """sd's predict_noise(x_t, t) from a sigma-view predict_eps(x, sigma): x = x_t sqrt(1 + sigma^2)."""
    return lambda x_t, t: predict_eps(x_t * (1 + sigmas[int(t)] ** 2) ** 0.5, sigmas[int(t)])


def _wobbly(x, sigma):
    return gaussian_eps(x, sigma) + 0.3 * torch.tanh(x) * torch.sin(3 * torch.log1p(sigma))


def _karras(n):
    sigmas = DiffusionScheduler().sigmas
    return torch.cat([reference_karras_sigmas(float(sigmas[0]), float(sigmas[-1]), n).float(), torch.zeros(1)])


def test_reference_euler_and_dpmpp_2m_are_sds_samplers():
    torch.manual_seed(0)
    noise, sigmas = torch.randn(2, 4, 6, 6), _karras(9)
    for ours, theirs in ((reference_euler_sample, sample_euler), (reference_dpmpp_2m_sample, sample_dpmpp_2m)):
        expected = theirs(_sd_predictor(_wobbly, sigmas), noise, _levels_for_sd(sigmas))
        torch.testing.assert_close(ours(_wobbly, noise, sigmas), expected, atol=1e-5, rtol=1e-5)


def test_reference_euler_sample_on_karras_sigmas_is_sd_euler_sampling():
    """The reference loop (the UNet sees x / sqrt(1 + sigma^2)) = DiffusionScheduler.sample with Karras sigmas."""
    torch.manual_seed(0)
    noise, context = torch.randn(1, 4, 6, 6), torch.randn(1, 77, 8)
    out = DiffusionScheduler().sample(toy_unet, context, latents=noise, num_inference_steps=STEPS, sampler="euler",
                                      use_karras_sigmas=True, progress=False)
    scheduler = _sd_euler(use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    sigmas = torch.cat([reference_karras_sigmas(scheduler.sigmas[-2].item(), scheduler.sigmas[0].item(), STEPS),
                        torch.zeros(1, dtype=torch.float64)]).float()
    got = reference_euler_sample(lambda x, sigma: toy_unet(x / (sigma ** 2 + 1) ** 0.5, context, None), noise, sigmas)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)


def test_reference_heun_sample_is_diffusers_heun():
    """diffusers' HeunDiscreteScheduler (SD's config, Karras sigmas) with a model of x only = the reference."""
    from diffusers import HeunDiscreteScheduler
    scheduler = HeunDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                                      use_karras_sigmas=True)
    scheduler.set_timesteps(8)
    torch.manual_seed(0)
    noise, context = torch.randn(1, 4, 6, 6), torch.randn(1, 77, 8)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = toy_unet(scheduler.scale_model_input(x, t), context, None)
        x = scheduler.step(eps, t, x).prev_sample
    levels = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])   # unique levels
    got = reference_heun_sample(lambda x, sigma: toy_unet(x / (sigma ** 2 + 1) ** 0.5, context, None), noise,
                                levels)
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_on_gaussian_data_euler_is_first_order_and_heun_and_dpmpp_2m_second_order():
    """Data N(0, s^2): x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)) exactly. Between 32 and
    64 steps on levels even in log sigma down to 0.05, the error ratio is about 2 (Euler) and 4 (the others)."""
    torch.manual_seed(0)
    noise = torch.randn(4, 4, 5, 5)
    sigma_max, sigma_min = 10.0, 0.05

    def levels(n):
        return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1))

    exact = noise * (1 + sigma_max ** 2) ** 0.5 * ((DATA_STD ** 2 + sigma_min ** 2)
                                                    / (DATA_STD ** 2 + sigma_max ** 2)) ** 0.5
    for solver, order in ((reference_euler_sample, 1), (reference_heun_sample, 2), (reference_dpmpp_2m_sample, 2)):
        errors = [(solver(gaussian_eps, noise, levels(n).double()) - exact).abs().max().item() for n in (32, 64)]
        ratio = errors[0] / errors[1]
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.25, (solver.__name__, errors, ratio)


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

def my_euler_sample(predict_eps, noise, sigmas):
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = x - sigma * predict_eps(x, sigma)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def my_heun_sample(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        dt = sigma_next - sigma
        d1 = predict_eps(x, sigma)
        if sigma_next > 0:
            d2 = predict_eps(x + dt * d1, sigma_next)
            x = x + dt * 0.5 * (d1 + d2)
        else:
            x = x + dt * d1
    return x


def my_dpmpp_2m_sample(predict_eps, noise, sigmas):
    """In lambda = -log sigma with exponentials, as Lu et al. write it (alpha = 1 in the sigma view)."""
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    lambdas = -torch.log(sigmas.clamp(min=1e-30))
    old = None
    for i in range(len(sigmas) - 1):
        x0 = x - sigmas[i] * predict_eps(x, sigmas[i])
        h = lambdas[i + 1] - lambdas[i]
        if old is None or sigmas[i + 1] == 0:
            D = x0
        else:
            r = (lambdas[i] - lambdas[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old
        x = torch.exp(-h) * x - torch.expm1(-h) * D
        old = x0
    return x


def my_karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """A Python loop in floats, returning a list: the check accepts it."""
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


def my_karras_sigmas_float32(sigma_min, sigma_max, n, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def my_error_curve(solver, predict_eps, levels_of, step_counts, noise, reference):
    rows = []
    for n in step_counts:
        calls = []
        out = solver(lambda x, sigma: calls.append(1) or predict_eps(x, sigma), noise, levels_of(n))
        rms = torch.stack([((o - r) ** 2).mean().sqrt() for o, r in zip(out, reference)])
        rows.append((len(calls), float(rms.median()), float(rms.max())))
    return rows


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_euler_sampler(reference_euler_sample) and check_euler_sampler(my_euler_sample)
    assert check_karras_sigmas(reference_karras_sigmas) and check_karras_sigmas(my_karras_sigmas)
    assert check_karras_sigmas(my_karras_sigmas_float32)
    assert check_heun_sampler(reference_heun_sample) and check_heun_sampler(my_heun_sample)
    assert check_dpmpp_2m_sampler(reference_dpmpp_2m_sample) and check_dpmpp_2m_sampler(my_dpmpp_2m_sample)
    assert check_error_curve(reference_error_curve) and check_error_curve(my_error_curve)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Done wrong
# ---------------------------------------------------------------------------------------------------------

def euler_from_unscaled_noise(predict_eps, noise, sigmas):
    x = noise.clone()
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i])
    return x


def euler_karras_start(predict_eps, noise, sigmas):
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i])
    return x


def euler_slope_at_the_next_level(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i + 1])
    return x


def euler_one_step_short(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for i in range(len(sigmas) - 2):
        x = x + (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i])
    return x


def euler_wrong_sign(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for i in range(len(sigmas) - 1):
        x = x - (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i])
    return x


@pytest.mark.parametrize("impl, mistake", [
    (euler_from_unscaled_noise, "starts from the noise itself"),
    (euler_karras_start, "sigma_max times the noise"),
    (euler_slope_at_the_next_level, "slope is read at the next level"),
    (euler_one_step_short, "stops one level early"),
    (euler_wrong_sign, "the steps go the wrong way"),
])
def test_check_euler_sampler_names_the_mistake(impl, mistake):
    message = rejects(check_euler_sampler, impl, "check_euler_sampler failed", "Hint: ", mistake)
    assert program_text(message) is None, message


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
    message = rejects(check_karras_sigmas, impl, "check_karras_sigmas failed", mistake)
    assert program_text(message) is None, message


def heun_always_corrects(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = predict_eps(x, sigma)
        d_next = predict_eps(x + (sigma_next - sigma) * d, sigma_next)
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x


def heun_corrects_from_the_euler_point(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = predict_eps(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        x = x_euler if sigma_next == 0 else x_euler + (sigma_next - sigma) * (d + predict_eps(x_euler, sigma_next)) / 2
    return x


def heun_new_slope_only(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = predict_eps(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        x = x_euler if sigma_next == 0 else x + (sigma_next - sigma) * predict_eps(x_euler, sigma_next)
    return x


@pytest.mark.parametrize("impl, mistake", [
    (my_euler_sample, "this is Euler's method"),
    (heun_always_corrects, "the step to sigma = 0 is corrected too"),
    (heun_corrects_from_the_euler_point, "starts from the Euler step's arrival point"),
    (heun_new_slope_only, "only the arrival point's slope"),
])
def test_check_heun_sampler_names_the_mistake(impl, mistake):
    message = rejects(check_heun_sampler, impl, "check_heun_sampler failed", mistake)
    assert program_text(message) is None, message


def dpmpp_extrapolating_to_the_end_of_the_step(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    old = old_h = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = x - sigma * predict_eps(x, sigma)
        h = torch.log(sigma / sigma_next) if sigma_next > 0 else None
        D = x0 if (old is None or h is None) else x0 + (x0 - old) * h / old_h
        x = sigma_next / sigma * x + (1 - sigma_next / sigma) * D
        old, old_h = x0, h
    return x


def dpmpp_with_steps_in_sigma(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    old = old_h = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = x - sigma * predict_eps(x, sigma)
        h = sigma - sigma_next
        D = x0 if (old is None or sigma_next == 0) else x0 + (x0 - old) * h / (2 * old_h)
        x = sigma_next / sigma * x + (1 - sigma_next / sigma) * D
        old, old_h = x0, h
    return x


@pytest.mark.parametrize("impl, mistake", [
    (my_euler_sample, "every step is first order"),
    (dpmpp_extrapolating_to_the_end_of_the_step, "extrapolated to the END of the step"),
    (dpmpp_with_steps_in_sigma, "step lengths are measured in sigma"),
])
def test_check_dpmpp_2m_sampler_names_the_mistake(impl, mistake):
    message = rejects(check_dpmpp_2m_sampler, impl, "check_dpmpp_2m_sampler failed", mistake)
    assert program_text(message) is None, message


def curve_counting_steps(solver, predict_eps, levels_of, step_counts, noise, reference):
    rows = my_error_curve(solver, predict_eps, levels_of, step_counts, noise, reference)
    return [(n, median, largest) for n, (_, median, largest) in zip(step_counts, rows)]


def curve_with_one_rms_for_the_batch(solver, predict_eps, levels_of, step_counts, noise, reference):
    rows = []
    for n in step_counts:
        calls = []
        out = solver(lambda x, sigma: calls.append(1) or predict_eps(x, sigma), noise, levels_of(n))
        rms = float(((out - reference) ** 2).mean().sqrt())
        rows.append((len(calls), rms, rms))
    return rows


@pytest.mark.parametrize("impl, mistake", [
    (curve_counting_steps, "the passes are the steps"),
    (curve_with_one_rms_for_the_batch, "one RMS over the whole batch"),
])
def test_check_error_curve_names_the_mistake(impl, mistake):
    message = rejects(check_error_curve, impl, "check_error_curve failed", mistake)
    assert program_text(message) is None, message


# ---------------------------------------------------------------------------------------------------------
# Wrong answers no check knows: the message says what differs, points to the hints, shows no code
# ---------------------------------------------------------------------------------------------------------

def euler_half_steps(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for i in range(len(sigmas) - 1):
        x = x + 0.5 * (sigmas[i + 1] - sigmas[i]) * predict_eps(x, sigmas[i])
    return x


def karras_squared(sigma_min, sigma_max, n, rho=7.0):
    return reference_karras_sigmas(sigma_min, sigma_max, n, rho) ** 2


def heun_weighted_two_thirds(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = predict_eps(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        x = x_euler if sigma_next == 0 else x + (sigma_next - sigma) * (d + 2 * predict_eps(x_euler, sigma_next)) / 3
    return x


def dpmpp_quarter_step(predict_eps, noise, sigmas):
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    old = old_h = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = x - sigma * predict_eps(x, sigma)
        h = torch.log(sigma / sigma_next) if sigma_next > 0 else None
        D = x0 if (old is None or h is None) else x0 + (x0 - old) * h / (4 * old_h)
        x = sigma_next / sigma * x + (1 - sigma_next / sigma) * D
        old, old_h = x0, h
    return x


def curve_with_doubled_distances(solver, predict_eps, levels_of, step_counts, noise, reference):
    return [(p, 2 * m, 2 * w) for p, m, w in my_error_curve(solver, predict_eps, levels_of, step_counts, noise,
                                                           reference)]


def test_a_wrong_answer_the_check_does_not_know_points_to_the_hints():
    rejects_unrecognised(check_euler_sampler, euler_half_steps, "8.1")
    rejects_unrecognised(check_karras_sigmas, karras_squared, "8.2")
    rejects_unrecognised(check_heun_sampler, heun_weighted_two_thirds, "8.3")
    rejects_unrecognised(check_dpmpp_2m_sampler, dpmpp_quarter_step, "8.4")
    rejects_unrecognised(check_error_curve, curve_with_doubled_distances, "8.5")


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(predict_eps, noise, sigmas):
        raise NotImplementedError("Exercise 8.1: Euler's sampler")

    assert pick(check_euler_sampler, stub, reference=reference_euler_sample) is reference_euler_sample
    assert "not done yet" in capsys.readouterr().out
