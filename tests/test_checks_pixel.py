"""The exercise checks of the pixel-diffusion notebook: the reference passes, plausible wrong ones are named.

The references are compared with diffusers (its DDPMScheduler's add_noise and step), an implementation written
independently of the course's; the wrong implementations below are written the way a learner would write them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sd.course.checks import check_ddpm_sampling, check_pixel_loss, pick
from sd.course.checks.pixel import (linear_betas, reference_ddpm_sample, reference_pixel_loss, run_timesteps)
from tests.check_helpers import program_text, rejects, rejects_unrecognised


def _diffusers_ddpm(num_train_timesteps: int) -> DDPMScheduler:
    """diffusers' DDPM with Ho et al.'s linear schedule, the posterior variance ("fixed_small"), x_0 clipped."""
    betas = linear_betas(num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(),
                         variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                         prediction_type="epsilon")


class ToyModel(torch.nn.Module):
    """model(x_t, t) -> eps, depending on x_t and t (so a wrong t shows)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x_t, t):
        return self.scale * x_t + 0.001 * t.float().view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# The references are the standard algorithms
# ---------------------------------------------------------------------------------------------------------

def test_reference_loss_noises_like_diffusers_and_regresses_the_noise():
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = reference_pixel_loss(model, x0, linear_betas(), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], _diffusers_ddpm(1000).add_noise(x0, noise, t))
    torch.testing.assert_close(loss, (noise ** 2).mean())     # a zero prediction: the loss is E[noise^2]


@pytest.mark.parametrize("num_train_timesteps, num_steps", [(1000, 1000), (1000, 10), (50, 50)])
def test_reference_sampling_is_diffusers_ddpm_on_the_same_timesteps(num_train_timesteps, num_steps):
    """Same model, same x_T, same noise: diffusers' DDPMScheduler with custom timesteps gives the same x_0."""
    timesteps = run_timesteps(num_train_timesteps, num_steps)
    betas = linear_betas(num_train_timesteps)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = ToyModel()
    ours = reference_ddpm_sample(model, x_T, timesteps, betas, torch.Generator().manual_seed(1))

    scheduler = _diffusers_ddpm(num_train_timesteps)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    generator, x = torch.Generator().manual_seed(1), x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(2)), t, x, generator=generator).prev_sample
    assert timesteps[0] == num_train_timesteps - 1 and timesteps[-1] == 0
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_run_timesteps_start_at_the_noisiest_and_end_at_zero():
    assert run_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    assert run_timesteps(1000, 4).tolist() == [999, 666, 333, 0]
    assert linear_betas()[0].item() == pytest.approx(1e-4) and linear_betas()[-1].item() == pytest.approx(0.02)


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

def my_loss(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t][:, None, None, None]
    return ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise) ** 2).mean()


def my_sampler(model, x_T, timesteps, betas, generator):
    """Written with a Python list of timesteps and torch.clamp: the same numbers."""
    alpha_bar = torch.cumprod(1 - betas, 0)
    x = x_T
    for i, t in enumerate(timesteps.tolist()):
        ab = alpha_bar[t]
        ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        beta = 1 - ab / ab_prev
        eps = model(x, torch.full((len(x),), t))
        x0 = torch.clamp((x - (1 - ab).sqrt() * eps) / ab.sqrt(), min=-1.0, max=1.0)
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
        if i + 1 < len(timesteps):
            mean = mean + ((1 - ab_prev) / (1 - ab) * beta).sqrt() * torch.randn(x.shape, generator=generator)
        x = mean
    return x


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_pixel_loss(reference_pixel_loss) and check_pixel_loss(my_loss)
    assert check_ddpm_sampling(reference_ddpm_sample) and check_ddpm_sampling(my_sampler)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# The loss, done wrong
# ---------------------------------------------------------------------------------------------------------

def loss_predicting_x0(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), x0)


def loss_with_alpha_not_alpha_bar(model, x0, betas, generator):
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = (1 - betas)[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)


def loss_without_sqrt(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a * x0 + (1 - a) * noise, t), noise)


def loss_noise_first(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)


def loss_as_a_number(model, x0, betas, generator):
    return my_loss(model, x0, betas, generator).item()


@pytest.mark.parametrize("impl, mistake", [
    (loss_predicting_x0, "the target is the clean image x₀"),
    (loss_with_alpha_not_alpha_bar, "α_t = 1 − β_t is used where ᾱ_t belongs"),
    (loss_without_sqrt, "the square roots are missing"),
    (loss_noise_first, "the noise is drawn before t"),
    (loss_as_a_number, "not its value as a Python number"),
])
def test_check_pixel_loss_names_the_mistake(impl, mistake):
    rejects(check_pixel_loss, impl, "check_pixel_loss failed", "Hint: ", mistake)


# ---------------------------------------------------------------------------------------------------------
# The sampling loop, done wrong
# ---------------------------------------------------------------------------------------------------------

def sampler_with(**how):
    """my_sampler written with one learner's slip (the slips are spelled out in the branches)."""
    def sample(model, x_T, timesteps, betas, generator):
        alpha_bar = torch.cumprod(1 - betas, 0)
        x, n = x_T, len(timesteps)
        for i in range(n):
            t = int(timesteps[i])
            ab = alpha_bar[t]
            ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < n else torch.tensor(1.0)
            if how.get("wraps") and i + 1 == n:
                ab_prev = alpha_bar[t - 1]                 # t = 0: alpha_bar[-1]
            alpha = ab if how.get("alpha_bar_as_alpha") else ab / ab_prev
            beta = 1 - alpha
            t_model = t - 1 if how.get("t_minus_one") and i + 1 < n else t
            eps = model(x, torch.full((len(x),), t_model))
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if not how.get("no_clip"):
                x0 = x0.clamp(-1, 1)
            mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x
            std = beta.sqrt() if how.get("beta_variance") else ((1 - ab_prev) / (1 - ab) * beta).sqrt()
            if i + 1 < n or how.get("noise_at_end"):
                mean = mean + std * torch.randn(x.shape, generator=generator)
            x = mean
        return x
    return sample


@pytest.mark.parametrize("how, mistake", [
    ({"noise_at_end": True, "beta_variance": True}, "is added at the last step too"),
    ({"beta_variance": True}, "Ho et al.'s other choice"),
    ({"wraps": True}, "the index wraps around"),
    ({"no_clip": True}, "not clipped to [−1, 1]"),
    ({"alpha_bar_as_alpha": True}, "ᾱ_t is used where the step's α_t belongs"),
])
def test_check_ddpm_sampling_names_the_mistake(how, mistake):
    rejects(check_ddpm_sampling, sampler_with(**how), "check_ddpm_sampling failed", "Hint: ", mistake)


def test_check_ddpm_sampling_names_the_model_fed_t_minus_one():
    """On the run over every timestep (the first input), t - 1 is the next timestep: named as off by one."""
    rejects(check_ddpm_sampling, sampler_with(t_minus_one=True), "random input 1 of 3", "max difference",
            "t is off by one")


def test_noise_at_the_last_step_is_harmless_with_the_posterior_variance():
    """beta_tilde is 0 when alpha_bar_prev = 1: the extra draw changes nothing, so the check (rightly) passes it."""
    assert check_ddpm_sampling(sampler_with(noise_at_end=True))


def test_check_ddpm_sampling_names_the_off_by_one_of_the_next_timestep():
    def sample(model, x_T, timesteps, betas, generator):
        shifted = torch.cat([timesteps[1:], timesteps[-1:]])   # the model sees the timestep it goes to
        alpha_bar = torch.cumprod(1 - betas, 0)
        x, n = x_T, len(timesteps)
        for i in range(n):
            ab = alpha_bar[timesteps[i]]
            ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < n else torch.tensor(1.0)
            beta = 1 - ab / ab_prev
            eps = model(x, torch.full((len(x),), int(shifted[i]) if i + 1 < n else 0))
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            x_new = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
            if i + 1 < n:
                x_new = x_new + ((1 - ab_prev) / (1 - ab) * beta).sqrt() * torch.randn(x.shape, generator=generator)
            x = x_new
        return x
    rejects(check_ddpm_sampling, sample, "t is off by one")


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(model, x0, betas, generator):
        raise NotImplementedError("Exercise: the loss")

    assert pick(check_pixel_loss, stub, reference=reference_pixel_loss) is reference_pixel_loss
    assert pick(check_pixel_loss, loss_predicting_x0, reference=reference_pixel_loss) is reference_pixel_loss
    out = capsys.readouterr().out
    assert "not done yet" in out and "clean image x₀" in out and "using the reference" in out


# ---------------------------------------------------------------------------------------------------------
# Behaviour the values alone do not show, and wrong answers the checks do not know
# ---------------------------------------------------------------------------------------------------------

def loss_with_global_noise(model, x0, betas, generator):
    """The timesteps from the generator, the noise from torch's global random numbers."""
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn_like(x0)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)


def loss_with_detached_prediction(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).requires_grad_()    # a gradient, but not to the weights
    return F.mse_loss(model(x_t, t).detach() + 0 * x_t, noise)


def loss_with_l1(model, x0, betas, generator):
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return F.l1_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)


def test_check_pixel_loss_rejects_noise_from_the_global_random_numbers():
    message = rejects(check_pixel_loss, loss_with_global_noise, "two calls with generators seeded alike",
                      "global random numbers", 'hint("4.1")')
    assert program_text(message) is None, message


def test_check_pixel_loss_rejects_a_loss_whose_gradient_does_not_reach_the_weights():
    message = rejects(check_pixel_loss, loss_with_detached_prediction, "no gradient reaches the model's weights")
    assert program_text(message) is None, message


def test_check_pixel_loss_points_to_the_hints_for_an_unknown_mistake():
    rejects_unrecognised(check_pixel_loss, loss_with_l1, "4.1")


def test_check_ddpm_sampling_points_to_the_hints_for_an_unknown_mistake():
    def clipped_to_half(model, x_T, timesteps, betas, generator):
        return my_sampler(model, x_T, timesteps, betas, generator).clamp(-0.5, 0.5)
    rejects_unrecognised(check_ddpm_sampling, clipped_to_half, "4.2")


def test_every_named_mistake_of_the_pixel_checks_is_words_not_code():
    for impl, check in [(loss_predicting_x0, check_pixel_loss), (loss_without_sqrt, check_pixel_loss),
                        (sampler_with(no_clip=True), check_ddpm_sampling),
                        (sampler_with(beta_variance=True), check_ddpm_sampling)]:
        message = rejects(check, impl, "Hint: ")
        assert program_text(message) is None, message


def test_reference_sampler_without_clipping_is_diffusers_with_clip_sample_off():
    timesteps, betas = run_timesteps(1000, 10), linear_betas()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = reference_ddpm_sample(ToyModel(), x_T, timesteps, betas, torch.Generator().manual_seed(1), clip_x0=False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, trained_betas=betas.tolist(), variance_type="fixed_small",
                              clip_sample=False, prediction_type="epsilon")
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    generator, x, model = torch.Generator().manual_seed(1), x_T, ToyModel()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(2)), t, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
