"""The exercise checks of notebook 06 (forward diffusion): the reference passes, plausible wrong ones are named.

The wrong implementations below are written the way a learner would write them (not taken from the checks),
so each test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd.course.checks import check_add_noise, check_schedule, pick
from sd.diffusion import DiffusionScheduler
from tests.check_helpers import rejects


# ---------------------------------------------------------------------------------------------------------
# 6.1 the schedule, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def schedule_in_a_loop(num_train_timesteps, beta_start, beta_end):
    """Right, written differently: a Python loop for the product."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps).pow(2)
    alphas = 1.0 - betas
    alphas_cumprod = torch.empty_like(alphas)
    running = 1.0
    for t in range(num_train_timesteps):
        running = running * alphas[t]
        alphas_cumprod[t] = running
    return betas, alphas, alphas_cumprod


def schedule_linear(num_train_timesteps, beta_start, beta_end):
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps)
    alphas = 1 - betas
    return betas, alphas, torch.cumprod(alphas, 0)


def schedule_without_cumprod(num_train_timesteps, beta_start, beta_end):
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
    alphas = 1 - betas
    return betas, alphas, alphas


def schedule_not_squared(num_train_timesteps, beta_start, beta_end):
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps)
    alphas = 1 - betas
    return betas, alphas, alphas.cumprod(0)


def schedule_in_numpy(num_train_timesteps, beta_start, beta_end):
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
    return betas, 1 - betas, np.cumprod(1 - betas)


# ---------------------------------------------------------------------------------------------------------
# 6.2 add_noise
# ---------------------------------------------------------------------------------------------------------

def add_noise_right(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t]
    while a.dim() < x0.dim():
        a = a.unsqueeze(-1)
    return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise


def add_noise_previous_index(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def add_noise_sqrt_beta(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    # beta_t recovered from the schedule: alpha_t = alpha_bar_t / alpha_bar_{t-1}
    previous = torch.cat([torch.ones(1), alphas_cumprod[:-1]])[t].view(-1, 1, 1, 1)
    beta = 1 - a / previous
    return a.sqrt() * x0 + beta.sqrt() * noise


def add_noise_no_reshape(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def add_noise_variance_not_std(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a) * noise


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

def test_diffusion_checks_pass_the_reference_with_one_line(capsys):
    def reference_schedule(n, beta_start, beta_end):
        s = DiffusionScheduler(n, beta_start, beta_end)
        return s.betas, s.alphas, s.alphas_cumprod

    def reference_add_noise(x0, noise, t, alphas_cumprod):
        s = DiffusionScheduler(len(alphas_cumprod))
        s.alphas_cumprod = alphas_cumprod      # the check also tries a 100-step DDPM schedule
        return s.add_noise(x0, noise, t)

    assert check_schedule(reference_schedule) is True
    assert check_add_noise(reference_add_noise) is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("✅ check_schedule passed: matches sd.course.checks.diffusion.reference_schedule")
    assert lines[1].startswith("✅ check_add_noise passed: matches sd.course.checks.diffusion.reference_add_noise")


def test_diffusion_checks_pass_correct_implementations_written_differently():
    assert check_schedule(schedule_in_a_loop)
    assert check_add_noise(add_noise_right)


def test_check_schedule_agrees_with_the_published_alpha_bar():
    # SD v1's alpha_bar_0 = 1 - 0.00085 and alpha_bar_999 = 0.0046601 (read from the released checkpoint)
    betas, _, alphas_cumprod = schedule_in_a_loop(1000, 0.00085, 0.012)
    assert abs(float(alphas_cumprod[0]) - 0.99915) < 1e-6
    assert abs(float(alphas_cumprod[-1]) - 0.0046601) < 1e-6


@pytest.mark.parametrize("impl, mistake", [
    (schedule_linear, "the betas are linear from beta_start to beta_end"),
    (schedule_without_cumprod, "not a cumulative product"),
    (schedule_not_squared, "must then be squared"),
])
def test_check_schedule_names_the_mistake(impl, mistake):
    rejects(check_schedule, impl, "check_schedule failed", mistake)


def test_check_schedule_says_which_output_differs():
    rejects(check_schedule, schedule_without_cumprod, "output [2] differs")
    rejects(check_schedule, schedule_linear, "output [0] differs")


def test_check_schedule_asks_for_tensors():
    rejects(check_schedule, schedule_in_numpy, "should be a tensor", "ndarray")


@pytest.mark.parametrize("impl, mistake", [
    (add_noise_previous_index, "alpha_bar is taken at t - 1"),
    (add_noise_sqrt_beta, "scaled by sqrt(beta_t)"),
    (add_noise_no_reshape, "not reshaped to (B, 1, 1, 1)"),
    (add_noise_variance_not_std, "scaled by 1 - alpha_bar_t, the variance"),
])
def test_check_add_noise_names_the_mistake(impl, mistake):
    rejects(check_add_noise, impl, "check_add_noise failed", "x0 (4, 3, 5, 4)", mistake)


def test_check_add_noise_names_the_next_index_on_a_later_input():
    def next_index(x0, noise, t, alphas_cumprod):
        a = alphas_cumprod[t + 1].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    rejects(check_add_noise, next_index, "alpha_bar is taken at t + 1")


def test_pick_goes_on_with_the_reference_add_noise(capsys):
    from sd.course.checks.diffusion import reference_add_noise as reference
    assert pick(check_add_noise, add_noise_no_reshape, reference=reference) is reference
    out = capsys.readouterr().out
    assert "❌ check_add_noise failed" in out and "using the reference" in out
