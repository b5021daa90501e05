"""The exercise checks of notebook 07 (sampling): the reference passes, plausible wrong implementations are named.

The wrong implementations are written the way a learner would write them (not taken from the checks), so each
test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import math

import pytest
import torch

from sd.course.checks import (check_classifier_free_guidance, check_ddim_step, check_ddpm_step, check_previous_alpha_bars,
                       pick)
from sd.course.checks.sampling import ToyUNet, reference_guidance
from sd.diffusion import DiffusionScheduler
from sd.samplers import ddim_step, ddpm_step
from tests.check_helpers import rejects


# ---------------------------------------------------------------------------------------------------------
# Correct implementations written differently from sd's (they must pass)
# ---------------------------------------------------------------------------------------------------------

def my_ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    """The mean in its eps form (Ho et al. eq. 11) instead of the x_0 form: the same number."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0 = (x_t - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)
    mean = (x_t - beta_t / torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_t)
    var = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return mean + torch.sqrt(var) * noise, x0


def my_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    a_t, a_prev = float(alpha_bar_t), float(alpha_bar_prev)
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    if eta > 0:
        out = out + sigma * noise
    return out, x0


def my_previous_alpha_bars(alphas_cumprod, timesteps):
    prev = [alphas_cumprod[t] for t in timesteps[1:]] + [alphas_cumprod[0]]
    return torch.stack(prev)


def my_guidance(unet, x, t, context, uncond_context, guidance_scale):
    both = unet(x.repeat(2, 1, 1, 1), torch.cat([uncond_context, context], dim=0), t)
    eps_uncond, eps_cond = both[: len(x)], both[len(x):]
    return guidance_scale * eps_cond + (1 - guidance_scale) * eps_uncond


def test_checks_pass_sd_and_correct_learner_code_with_one_line_each(capsys):
    assert check_ddpm_step(ddpm_step) and check_ddpm_step(my_ddpm_step)
    assert check_ddim_step(ddim_step) and check_ddim_step(my_ddim_step)
    assert check_previous_alpha_bars(my_previous_alpha_bars)
    assert check_classifier_free_guidance(my_guidance) and check_classifier_free_guidance(reference_guidance)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)
    assert "matches sd.samplers.noise_levels('ddim', ...).alpha_bars[1:] on 3 random inputs" in lines[4]


def testreference_previous_alpha_bars_is_what_ddim_sampling_uses():
    """The check's reference ends on alpha_bar_0 and steps T // n: read off SD's numbers (diffusers: 981 ... 1)."""
    acp = DiffusionScheduler().alphas_cumprod
    got = []
    check_previous_alpha_bars(lambda ac, ts: got.append((ac, ts)) or my_previous_alpha_bars(ac, ts))
    ac, ts = got[0]
    assert ts[:3].tolist() == [901, 801, 701] and ts[-1].item() == 1   # 10 steps, leading spacing, offset 1
    assert torch.equal(ac, acp)
    assert abs(acp[0].item() - 0.99915) < 1e-6                         # SD's alpha_bar_0 (SD_FACTS)


def testreference_guidance_is_the_schedulers_guidance():
    """One DDIM step of DiffusionScheduler.sample with the toy UNet equals ddim_step on the check's guided eps."""
    torch.manual_seed(0)
    x, context, uncond = torch.randn(2, 4, 6, 6), torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    scheduler = DiffusionScheduler()
    out = scheduler.sample(ToyUNet(), context, latents=x, uncond_context=uncond, guidance_scale=7.5,
                           num_inference_steps=1, progress=False)
    t = scheduler.timesteps(1)[0]   # 1 step: t = 1, ending on alpha_bar_0
    eps = reference_guidance(ToyUNet(), x, t, context, uncond, 7.5)
    expected, _ = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[0])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.1: the DDPM step, done wrong
# ---------------------------------------------------------------------------------------------------------

def ddpm_fixed_large_variance(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    alpha_t = alpha_bar_t / alpha_bar_prev
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    mean = (x_t - (1 - alpha_t) / (1 - alpha_bar_t).sqrt() * eps) / alpha_t.sqrt()
    return mean + (1 - alpha_t).sqrt() * noise, x0


def ddpm_variance_not_square_rooted(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    alpha_t = alpha_bar_t / alpha_bar_prev
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    mean = (x_t - (1 - alpha_t) / (1 - alpha_bar_t).sqrt() * eps) / alpha_t.sqrt()
    return mean + (1 - alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * noise, x0


def ddpm_alpha_bar_t_for_prev(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    a_prev = alpha_bar_t   # "the alpha of this step"
    alpha_t = alpha_bar_t / a_prev
    beta_t = 1 - alpha_t
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    mean = a_prev ** 0.5 * beta_t / (1 - alpha_bar_t) * x0 + alpha_t ** 0.5 * (1 - a_prev) / (1 - alpha_bar_t) * x_t
    return mean + (beta_t * (1 - a_prev) / (1 - alpha_bar_t)) ** 0.5 * noise, x0


def ddpm_x0_without_sqrt(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
    mean = alpha_bar_prev ** 0.5 * beta_t / (1 - alpha_bar_t) * x0 \
        + alpha_t ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
    return mean + (beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5 * noise, x0


def ddpm_without_noise(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    return my_ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, torch.zeros_like(noise))


@pytest.mark.parametrize("impl, mistake", [
    (ddpm_fixed_large_variance, "fixed large"),
    (ddpm_variance_not_square_rooted, "multiplied by the variance"),
    (ddpm_alpha_bar_t_for_prev, "alpha_bar_t is used where alpha_bar_prev belongs"),
    (ddpm_x0_without_sqrt, "square root is missing"),
    (ddpm_without_noise, "no noise is added"),
])
def test_check_ddpm_step_names_the_mistake(impl, mistake):
    rejects(check_ddpm_step, impl, "check_ddpm_step failed", "max difference", "Hint: ", mistake)


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.2: the DDIM step, done wrong
# ---------------------------------------------------------------------------------------------------------

def ddim_without_sqrt_on_prev(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    out = alpha_bar_prev * x0 + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    return (out if noise is None else out + sigma * noise), x0


def ddim_direction_without_sqrt(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    out = torch.sqrt(alpha_bar_prev) * x0 + (1 - alpha_bar_prev - sigma ** 2) * eps
    return (out if noise is None else out + sigma * noise), x0


def ddim_alpha_bar_t_for_prev(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    return alpha_bar_t ** 0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * eps, x0


def ddim_ignoring_eta(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps, x0


def ddim_noise_without_taking_sigma_out(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    out = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
    if noise is not None:
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
        out = out + sigma * noise
    return out, x0


def ddim_sigma_ratio_inverted(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_prev / alpha_bar_t)) ** 0.5
    out = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - sigma ** 2) ** 0.5 * eps
    return (out if noise is None else out + sigma * noise), x0


@pytest.mark.parametrize("impl, mistake", [
    (ddim_without_sqrt_on_prev, "square root of alpha_bar_prev is missing"),
    (ddim_direction_without_sqrt, "direction's coefficient"),
    (ddim_alpha_bar_t_for_prev, "alpha_bar_t is used where alpha_bar_prev belongs"),
    (ddim_ignoring_eta, "eta is ignored"),
    (ddim_noise_without_taking_sigma_out, "not taken out of the direction"),
    (ddim_sigma_ratio_inverted, "ratio is inverted"),
])
def test_check_ddim_step_names_the_mistake(impl, mistake):
    rejects(check_ddim_step, impl, "check_ddim_step failed", mistake)


def test_check_ddim_step_says_which_input_with_eta():
    rejects(check_ddim_step, ddim_ignoring_eta, "random input 4 of 5", "eta 1.0, noise (2, 4, 6, 5)")


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.3: alpha_bar_prev of a run, done wrong
# ---------------------------------------------------------------------------------------------------------

def prev_alphas_ending_on_one(alphas_cumprod, timesteps):
    return torch.cat([alphas_cumprod[timesteps[1:]], torch.tensor([1.0])])


def prev_alphas_wrapping_around(alphas_cumprod, timesteps):
    step = len(alphas_cumprod) // len(timesteps)
    return alphas_cumprod[timesteps - step]


def prev_alphas_are_alpha_bar_t(alphas_cumprod, timesteps):
    return alphas_cumprod[timesteps]


def prev_alphas_one_training_step(alphas_cumprod, timesteps):
    return alphas_cumprod[timesteps - 1]


@pytest.mark.parametrize("impl, mistake", [
    (prev_alphas_ending_on_one, "set_alpha_to_one = False"),
    (prev_alphas_wrapping_around, "wraps around"),
    (prev_alphas_are_alpha_bar_t, "this is alpha_bar_t itself"),
    (prev_alphas_one_training_step, "previous training step t - 1"),
])
def test_check_previous_alpha_bars_names_the_mistake(impl, mistake):
    rejects(check_previous_alpha_bars, impl, "check_previous_alpha_bars failed", mistake)


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.4: classifier-free guidance, done wrong
# ---------------------------------------------------------------------------------------------------------

def guidance_swapped(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_cond + guidance_scale * (eps_uncond - eps_cond)


def guidance_halves_read_backwards(unet, x, t, context, uncond_context, guidance_scale):
    eps_cond, eps_uncond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guidance_on_cond_base(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_cond + guidance_scale * (eps_cond - eps_uncond)


def guidance_without_parentheses(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_uncond + guidance_scale * eps_cond - eps_uncond


def guidance_scale_on_uncond(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return guidance_scale * eps_uncond + (eps_cond - eps_uncond)


def guidance_in_two_passes(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(x, uncond_context, t), unet(x, context, t)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guidance_cond_first(unet, x, t, context, uncond_context, guidance_scale):
    eps_cond, eps_uncond = unet(torch.cat([x, x]), torch.cat([context, uncond_context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guidance_x_not_doubled(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(x, torch.cat([uncond_context, context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@pytest.mark.parametrize("impl, mistake", [
    (guidance_swapped, "cond and uncond are swapped"),
    (guidance_halves_read_backwards, "eps_uncond, eps_cond = out.chunk(2)"),
    (guidance_on_cond_base, "starts from eps_cond"),
    (guidance_without_parentheses, "put the difference in parentheses"),
    (guidance_scale_on_uncond, "the scale multiplies the wrong term"),
])
def test_check_classifier_free_guidance_names_the_mistake(impl, mistake):
    rejects(check_classifier_free_guidance, impl, "check_classifier_free_guidance failed", mistake)


def test_check_classifier_free_guidance_wants_one_batched_pass_uncond_first():
    rejects(check_classifier_free_guidance, guidance_in_two_passes, "called the UNet 2 times", "ONE batch")
    rejects(check_classifier_free_guidance, guidance_cond_first, "conditional half first",
            "torch.cat([uncond_context, context])")
    rejects(check_classifier_free_guidance, guidance_x_not_doubled, "raised ValueError",
            "x with batch 1 but context with batch 2")


def test_pick_goes_on_with_the_reference_step_when_the_exercise_is_not_done(capsys):
    def stub(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
        raise NotImplementedError("Exercise 7.2: the DDIM step")

    assert pick(check_ddim_step, stub, reference=ddim_step) is ddim_step
    assert pick(check_ddim_step, ddim_sigma_ratio_inverted, reference=ddim_step) is ddim_step
    out = capsys.readouterr().out
    assert "not done yet: Exercise 7.2" in out and "NaN" in out and "using the reference sd.samplers.ddim_step" in out


def test_check_ddim_step_wants_the_tuple_the_exercise_returns_not_a_list():
    def ddim_step_as_list(*args, **kwargs):
        return list(ddim_step(*args, **kwargs))

    rejects(check_ddim_step, ddim_step_as_list, "should be a tuple of 2 items", "got a list of 2 items")
