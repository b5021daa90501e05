"""The checks of notebook 16 (consistency models) pass right answers and reject the typical mistakes, naming them."""
from __future__ import annotations

import torch

from sd.course.checks.consistency import (check_consistency_function, check_consistency_loss,
                                          check_consistency_sampler)
from sd.training.consistency import GUIDANCE_RANGE, consistency_distillation_loss, skipping_timesteps
from check_helpers import rejects, rejects_unrecognised

SIGMA_DATA, SCALING = 0.5, 10.0      # LCM's (Luo et al. 2023; diffusers' LCMScheduler), written out, not imported


def hand_function(x_t, eps, t, alphas_cumprod, scaling=SCALING, swap=False):
    s = t.float().view(-1, 1, 1, 1) * scaling
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / torch.sqrt(s ** 2 + SIGMA_DATA ** 2)
    if swap:
        c_skip, c_out = c_out, c_skip
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    return c_skip * x_t + c_out * x0


def test_the_function_check_passes_a_hand_written_function(capsys):
    assert check_consistency_function(hand_function)
    assert "check_consistency_function passed" in capsys.readouterr().out


def test_the_function_check_names_the_missing_scaling_and_the_exchanged_weights():
    rejects(check_consistency_function, lambda *a: hand_function(*a, scaling=1.0), "the timestep is not scaled")
    rejects(check_consistency_function, lambda *a: hand_function(*a, swap=True), "c_skip and c_out are exchanged")


def test_the_function_check_rejects_an_unknown_mistake_without_showing_code():
    rejects_unrecognised(check_consistency_function, lambda *a: 1.1 * hand_function(*a), "16.1")


def hand_loss(student, target, teacher, z0, context, uncond, generator, alphas_cumprod,
              target_from=None, detach_target=True):
    b = z0.shape[0]
    t, t_prev = skipping_timesteps(b, len(alphas_cumprod), generator)
    noise = torch.randn(z0.shape, generator=generator)
    w = (GUIDANCE_RANGE[0] + (GUIDANCE_RANGE[1] - GUIDANCE_RANGE[0]) * torch.rand(b, generator=generator))
    w = w.view(-1, 1, 1, 1)
    a, a_prev = alphas_cumprod[t].view(-1, 1, 1, 1), alphas_cumprod[t_prev].view(-1, 1, 1, 1)
    x_t = torch.sqrt(a) * z0 + torch.sqrt(1 - a) * noise
    with torch.no_grad():
        eps_c, eps_u = teacher(x_t, context, t), teacher(x_t, uncond.expand(b, -1, -1), t)
        eps = eps_u + w * (eps_c - eps_u)
        x_prev = torch.sqrt(a_prev) * (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a) + torch.sqrt(1 - a_prev) * eps
    goal_net = target_from(student, target) if target_from else target
    with torch.set_grad_enabled(not detach_target):
        goal = hand_function(x_prev, goal_net(x_prev, context, t_prev), t_prev, alphas_cumprod)
    pred = hand_function(x_t, student(x_t, context, t), t, alphas_cumprod)
    return ((pred - goal) ** 2).mean()


def test_the_loss_check_passes_a_hand_written_loss_and_the_package_loss(capsys):
    assert check_consistency_loss(hand_loss)
    assert check_consistency_loss(consistency_distillation_loss)
    assert "check_consistency_loss passed" in capsys.readouterr().out


def test_the_loss_check_names_the_student_as_its_own_target():
    rejects(check_consistency_loss, lambda *a: hand_loss(*a, target_from=lambda s, tg: s),
            "the student is its own target")


def test_the_loss_check_sees_a_gradient_reaching_the_target():
    rejects(check_consistency_loss, lambda *a: hand_loss(*a, detach_target=False), "a gradient reached the target")


def test_the_loss_check_sees_a_detached_loss_and_the_global_generator():
    rejects(check_consistency_loss, lambda *a: hand_loss(*a).detach(), "no gradient back to the student")

    def global_rng(student, target, teacher, z0, context, uncond, generator, alphas_cumprod):
        own = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
        return hand_loss(student, target, teacher, z0, context, uncond, own, alphas_cumprod)

    rejects(check_consistency_loss, global_rng, "same generator gave different losses")


def test_the_loss_check_rejects_an_unknown_mistake_without_showing_code():
    rejects_unrecognised(check_consistency_loss, lambda *a: 1.5 * hand_loss(*a), "16.2")


def hand_sampler(predict_noise, x, timesteps, alphas_cumprod, generator, fresh_noise=True):
    for i, t in enumerate(timesteps):
        eps = predict_noise(x, t)
        a = alphas_cumprod[t]
        s = t.float() * SCALING
        c_skip, c_out = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2), s / torch.sqrt(s ** 2 + SIGMA_DATA ** 2)
        denoised = c_skip * x + c_out * (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        if i == len(timesteps) - 1:
            return denoised
        a_next = alphas_cumprod[timesteps[i + 1]]
        noise = torch.randn(x.shape, generator=generator) if fresh_noise else eps
        x = torch.sqrt(a_next) * denoised + torch.sqrt(1 - a_next) * noise


def test_the_sampler_check_passes_a_hand_written_loop(capsys):
    assert check_consistency_sampler(hand_sampler)
    assert "check_consistency_sampler passed" in capsys.readouterr().out


def test_the_sampler_check_names_a_ddim_step_instead_of_fresh_noise():
    rejects(check_consistency_sampler, lambda *a: hand_sampler(*a, fresh_noise=False), "a DDIM step")


def test_the_sampler_check_rejects_an_unknown_mistake_without_showing_code():
    rejects_unrecognised(check_consistency_sampler, lambda *a: hand_sampler(*a) + 0.1, "16.3")
