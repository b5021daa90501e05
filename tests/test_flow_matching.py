"""Flow matching (sd.flow_matching) against diffusers' FlowMatchEulerDiscreteScheduler and the maths of the path;
the Fréchet distance (sd.training.frechet) against scipy's matrix square root."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd.flow_matching import (flow_matching_loss, flow_sigmas, logit_normal_density, sample_flow_euler,
                              sample_training_times, shift_times, sigma_of_time, straight_path, time_of_sigma,
                              velocity_target)
from sd.training.frechet import frechet_distance


@pytest.mark.parametrize("steps", [1, 4, 8, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_sigmas_match_diffusers_flow_match_euler_scheduler(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert ours.shape == scheduler.sigmas.shape
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1e-7)
    # the model sees timesteps = sigmas * 1000 (the last 0 is never fed to it)
    torch.testing.assert_close(ours[:-1] * 1000, scheduler.timesteps.float(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampling_matches_diffusers_step_by_step(shift):
    torch.manual_seed(0)
    target = torch.randn(2, 4, 8, 8)

    def velocity(x, t):      # a field with a known pull towards `target`, depending on t
        return (x - target) / (0.3 + t.view(-1, 1, 1, 1))

    noise = torch.randn(2, 4, 8, 8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(6)
    x = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(2)
        x = scheduler.step(velocity(x, t), timestep, x).prev_sample
    ours = sample_flow_euler(velocity, noise, flow_sigmas(6, shift))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_straight_path_is_data_at_0_noise_at_1_and_moves_with_the_velocity():
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(straight_path(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(straight_path(x0, eps, torch.ones(3)), eps)
    t, dt = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    slope = (straight_path(x0.double(), eps.double(), (t + dt).double())
             - straight_path(x0.double(), eps.double(), t.double())) / dt
    torch.testing.assert_close(slope.float(), velocity_target(x0, eps), rtol=1e-4, atol=1e-4)


def test_the_straight_path_divided_by_one_minus_t_is_the_sigma_view():
    torch.manual_seed(2)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.3, 0.6, 0.95], dtype=torch.float64)
    scaled = straight_path(x0.double(), eps.double(), t) / (1 - t).view(-1, 1)
    sigma = sigma_of_time(t).view(-1, 1)
    torch.testing.assert_close(scaled, x0.double() + sigma * eps.double())
    torch.testing.assert_close(time_of_sigma(sigma_of_time(t)), t)


def test_shift_multiplies_the_sigma_of_every_time_by_the_shift():
    t = torch.tensor([0.05, 0.25, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(sigma_of_time(shift_times(t, 3.0)), 3.0 * sigma_of_time(t))
    with pytest.raises(ValueError, match="shift must be a finite number > 0, got 0"):
        shift_times(t, 0)


def test_logit_normal_times_follow_their_density():
    generator = torch.Generator().manual_seed(0)
    t = sample_training_times(200_000, generator)
    assert 0 < float(t.min()) and float(t.max()) < 1
    counts, edges = np.histogram(t.numpy(), bins=20, range=(0, 1), density=True)
    centres = torch.tensor((edges[:-1] + edges[1:]) / 2)
    expected = logit_normal_density(centres)
    assert np.abs(counts[2:-2] - expected[2:-2].numpy()).max() < 0.03
    # the density integrates to 1 (a midpoint sum over a fine grid)
    grid = torch.linspace(0.5e-5, 1 - 0.5e-5, 100_000, dtype=torch.float64)
    assert abs(float(logit_normal_density(grid).sum()) / 100_000 - 1) < 1e-3
    assert abs(float(sample_training_times(100_000, generator, density="uniform").mean()) - 0.5) < 0.01


def test_the_loss_is_the_velocity_error_and_zero_for_the_true_velocity():
    torch.manual_seed(3)
    x0 = torch.randn(8, 2)
    # A "model" that knows the noise: with the same generator draws, the exact velocity gives zero loss.
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = sample_training_times(8, gen_b, density="uniform")
    noise = torch.randn(x0.shape, generator=gen_b)
    truth = velocity_target(x0, noise)
    assert float(flow_matching_loss(lambda x, tt: truth, x0, gen_a, density="uniform")) == 0.0
    gen_c = torch.Generator().manual_seed(5)
    loss = flow_matching_loss(lambda x, tt: torch.zeros_like(x), x0, gen_c, density="uniform")
    torch.testing.assert_close(loss, (truth ** 2).mean())
    assert t.shape == (8,)


def test_frechet_distance_matches_the_formula_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    ours = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert math.isclose(ours, expected, rel_tol=1e-6)
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-6


@pytest.mark.parametrize("a, b, message", [
    (torch.zeros(1, 3), torch.zeros(5, 3), "a must be a (N, D) feature tensor with N >= 2, got (1, 3)"),
    (torch.zeros(5, 3), torch.zeros(5, 4), "the feature sizes differ (3 and 4)"),
    (torch.full((5, 3), float("nan")), torch.zeros(5, 3), "a has NaN or infinite features"),
])
def test_frechet_distance_refuses_bad_features_in_one_line(a, b, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        frechet_distance(a, b)
