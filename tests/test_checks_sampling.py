"""The exercise checks of notebook 07 (sampling): the reference passes, plausible wrong implementations are named.

The wrong implementations are written the way a learner would write them (not taken from the checks), so each
test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import math

import pytest
import torch

from sd.course.checks import (check_classifier_free_guidance, check_ddim_step, check_ddpm_step, check_sampling_loop,
                              pick)
from sd.course.checks.sampling import ToyUNet, reference_guidance, reference_sampler
from sd.diffusion import DiffusionScheduler
from sd.samplers import ddim_step, ddpm_step, randn
from tests.check_helpers import program_text, rejects, rejects_unrecognised


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


def my_guidance(unet, x, t, context, uncond_context, guidance_scale):
    both = unet(x.repeat(2, 1, 1, 1), torch.cat([uncond_context, context], dim=0), t)
    eps_uncond, eps_cond = both[: len(x)], both[len(x):]
    return guidance_scale * eps_cond + (1 - guidance_scale) * eps_uncond


def my_sampler(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method="ddim", eta=0.0,
               generator=None, *, step_fn=None, guide=my_guidance, timesteps=None, final=None, noise_draw=None):
    """A learner's loop over my steps above; the keyword arguments after * plant one mistake at a time."""
    T = len(alphas_cumprod)
    ts = torch.tensor([(steps - 1 - i) * (T // steps) + 1 for i in range(steps)]) if timesteps is None \
        else timesteps(T, steps)
    last = (alphas_cumprod[0] if method == "ddim" else torch.tensor(1.0)) if final is None else final(alphas_cumprod)
    x, trajectory = x_T, []
    for i, t in enumerate(ts):
        prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else last
        eps = guide(unet, x, t, context, uncond_context, guidance_scale)
        noise = randn(x.shape, generator, x.dtype, x.device) if (method == "ddpm" or eta > 0) else None
        if noise_draw is not None:
            noise = noise_draw(noise, i)
        if method == "ddpm":
            x_next, x0 = my_ddpm_step(x, eps, alphas_cumprod[t], prev, noise)
        else:
            x_next, x0 = my_ddim_step(x, eps, alphas_cumprod[t], prev, eta, noise)
        trajectory.append((int(t), x, x0))
        x = x_next
    return x, trajectory


def test_checks_pass_sd_and_correct_learner_code_with_one_line_each(capsys):
    assert check_ddpm_step(ddpm_step) and check_ddpm_step(my_ddpm_step)
    assert check_ddim_step(ddim_step) and check_ddim_step(my_ddim_step)
    assert check_classifier_free_guidance(my_guidance) and check_classifier_free_guidance(reference_guidance)
    assert check_sampling_loop(my_sampler) and check_sampling_loop(reference_sampler)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)
    assert "sd's DDIM and DDPM samplers" in lines[6]


def test_reference_sampler_is_sds_scheduler_on_sds_own_timesteps():
    """The loop check's reference equals DiffusionScheduler.sample (the code pipe.generate runs), DDIM and DDPM,
    and visits SD's timesteps 901, 801, ..., 1 in 10 steps (diffusers' leading spacing with offset 1)."""
    torch.manual_seed(0)
    x, context, uncond = torch.randn(1, 4, 6, 6), torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    scheduler = DiffusionScheduler()
    for method in ("ddim", "ddpm"):
        out = scheduler.sample(ToyUNet(), context, latents=x, uncond_context=uncond, guidance_scale=7.5,
                               num_inference_steps=10, sampler=method, progress=False,
                               generator=torch.Generator().manual_seed(3))
        ours, trajectory = reference_sampler(ToyUNet(), x, context, uncond, scheduler.alphas_cumprod, 10, 7.5,
                                             method=method, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, out)
        assert [t for t, _, _ in trajectory] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_reference_guidance_is_the_schedulers_guidance():
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


def ddpm_votes_with_beta_as_variance(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    """Two Gaussian votes on x_prev combined by precision, but the vote of x_t keeps the variance beta_t."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    precision = 1 / (1 - alpha_t) + 1 / (1 - alpha_bar_prev)
    mean = (x_t / alpha_t.sqrt() / (1 - alpha_t) + alpha_bar_prev.sqrt() * x0 / (1 - alpha_bar_prev)) / precision
    return mean + precision ** -0.5 * noise, x0


def ddpm_without_noise(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    return my_ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, torch.zeros_like(noise))


@pytest.mark.parametrize("impl, mistake", [
    (ddpm_fixed_large_variance, "fixed large"),
    (ddpm_variance_not_square_rooted, "multiplied by the posterior's variance"),
    (ddpm_alpha_bar_t_for_prev, "alpha_bar_t is used where alpha_bar_prev belongs"),
    (ddpm_x0_without_sqrt, "square root is missing"),
    (ddpm_without_noise, "no noise is added"),
    (ddpm_votes_with_beta_as_variance, "divides the variance by alpha_t, so it is beta_t / alpha_t"),
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


def ddim_fresh_noise_as_direction(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    direction = eps if noise is None else noise
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - sigma ** 2) ** 0.5 * direction, x0


@pytest.mark.parametrize("impl, mistake", [
    (ddim_fresh_noise_as_direction, "fresh noise replaces the predicted noise"),
    (ddim_without_sqrt_on_prev, "square root of alpha_bar_prev is missing"),
    (ddim_direction_without_sqrt, "the noise's coefficient is missing"),
    (ddim_alpha_bar_t_for_prev, "alpha_bar_t is used where alpha_bar_prev belongs"),
    (ddim_ignoring_eta, "eta is ignored"),
    (ddim_noise_without_taking_sigma_out, "not taken out of the predicted noise's part"),
    (ddim_sigma_ratio_inverted, "ratio is inverted"),
])
def test_check_ddim_step_names_the_mistake(impl, mistake):
    rejects(check_ddim_step, impl, "check_ddim_step failed", mistake)


def test_check_ddim_step_says_which_input_with_eta():
    rejects(check_ddim_step, ddim_ignoring_eta, "random input 4 of 5", "eta 1.0, noise (2, 4, 6, 5)")


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.3: classifier-free guidance, done wrong
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
    (guidance_halves_read_backwards, "first half of the UNet's output"),
    (guidance_on_cond_base, "starts from eps_cond"),
    (guidance_without_parentheses, "multiplies the whole difference"),
    (guidance_scale_on_uncond, "the scale multiplies the wrong term"),
])
def test_check_classifier_free_guidance_names_the_mistake(impl, mistake):
    rejects(check_classifier_free_guidance, impl, "check_classifier_free_guidance failed", mistake)


def test_check_classifier_free_guidance_wants_one_batched_pass_uncond_first():
    rejects(check_classifier_free_guidance, guidance_in_two_passes, "called the UNet 2 times", "ONE batch")
    rejects(check_classifier_free_guidance, guidance_cond_first, "conditional half first",
            "unconditional context first")
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


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.4: the sampling loop, done wrong
# ---------------------------------------------------------------------------------------------------------

def _timesteps_without_offset(T, steps):
    return torch.tensor([(steps - 1 - i) * (T // steps) for i in range(steps)])


def _timesteps_evenly_from_999(T, steps):
    return torch.linspace(T - 1, 0, steps).round().long()


def _guidance_with_swapped_contexts(unet, x, t, context, uncond_context, guidance_scale):
    return my_guidance(unet, x, t, uncond_context, context, guidance_scale)


def _unguided(unet, x, t, context, uncond_context, guidance_scale):
    return unet(x, context, t)


def _same_noise_every_step(noise, i, first=[]):
    if i == 0:
        first[:] = [noise]
    return first[0] if noise is not None else None


@pytest.mark.parametrize("mistake, named", [
    (dict(timesteps=_timesteps_without_offset), "lack SD's offset of 1"),
    (dict(timesteps=_timesteps_evenly_from_999), "spread evenly from 999 to 0"),
    (dict(final=lambda ac: torch.tensor(1.0)), "last DDIM step lands on alpha_bar = 1"),
    (dict(final=lambda ac: ac[0]), "last DDPM step lands on alpha_bar_0"),
    (dict(guide=_guidance_with_swapped_contexts), "swapped in the guidance call"),
    (dict(guide=_unguided), "the guidance scale is not used"),
    (dict(noise_draw=_same_noise_every_step), "reuse one noise draw"),
])
def test_check_sampling_loop_names_the_mistake(mistake, named):
    def wrong(*args, **kwargs):
        return my_sampler(*args, **kwargs, **mistake)

    message = rejects(check_sampling_loop, wrong, "check_sampling_loop failed", named)
    assert program_text(message) is None, message


def test_check_sampling_loop_reads_the_trajectory_and_its_timesteps():
    def trajectory_after_the_step(*args, **kwargs):
        x, trajectory = my_sampler(*args, **kwargs)
        return x, [(t, x_next, x0) for (t, _, x0), (_, x_next, _) in zip(trajectory, trajectory[1:] + [(0, x, 0)])]

    def no_trajectory(*args, **kwargs):
        return my_sampler(*args, **kwargs)[0]

    rejects(check_sampling_loop, trajectory_after_the_step, "the final latents match sd's", "step 1's x_t",
            'hint("7.4")')
    rejects(check_sampling_loop, no_trajectory, "should give back a pair")


# ---------------------------------------------------------------------------------------------------------
# Wrong answers no check knows: the message says what differs, points to the hints, shows no code
# ---------------------------------------------------------------------------------------------------------

def ddpm_mean_only_from_x0(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    return alpha_bar_prev ** 0.5 * x0 + 0.1 * noise, x0


def ddim_half_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    x_prev, x0 = ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise)
    return (x_t + x_prev) / 2, x0


def guidance_squared(unet, x, t, context, uncond_context, guidance_scale):
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_uncond + guidance_scale ** 2 * (eps_cond - eps_uncond)


def sampler_skipping_the_last_step(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale,
                                   method="ddim", eta=0.0, generator=None):
    x, trajectory = my_sampler(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method, eta,
                               generator)
    return trajectory[-1][1], trajectory[:-1]


def test_a_wrong_answer_the_check_does_not_know_points_to_the_hints():
    rejects_unrecognised(check_ddpm_step, ddpm_mean_only_from_x0, "7.1")
    rejects_unrecognised(check_ddim_step, ddim_half_step, "7.2")
    rejects_unrecognised(check_classifier_free_guidance, guidance_squared, "7.3")
    rejects_unrecognised(check_sampling_loop, sampler_skipping_the_last_step, "7.4")


def test_every_named_mistake_of_07_is_words_not_code():
    """Run each check on a wrong answer per mistake it knows: no message shows program text."""
    for impl in (ddpm_fixed_large_variance, ddpm_x0_without_sqrt, ddpm_without_noise):
        assert program_text(rejects(check_ddpm_step, impl)) is None
    for impl in (ddim_ignoring_eta, ddim_sigma_ratio_inverted, ddim_alpha_bar_t_for_prev):
        assert program_text(rejects(check_ddim_step, impl)) is None
    for impl in (guidance_swapped, guidance_in_two_passes, guidance_cond_first, guidance_without_parentheses):
        assert program_text(rejects(check_classifier_free_guidance, impl)) is None
