"""The checks of notebook 13 (flow matching) pass the reference and reject the typical mistakes, naming them."""
from __future__ import annotations

import torch

from sd.course.checks.flow import (check_flow_matching_loss, check_flow_sampler, check_velocity_to_x0_eps,
                                   reference_velocity_to_x0_eps)
from sd.flow_matching import flow_matching_loss, sample_flow_euler
from check_helpers import rejects, rejects_unrecognised


def right_loss(model, x0, generator):
    t = torch.rand(x0.shape[0], generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return ((model((1 - tt) * x0 + tt * noise, t) - (noise - x0)) ** 2).mean()


def test_the_loss_check_passes_a_hand_written_loss_and_the_package_loss(capsys):
    assert check_flow_matching_loss(right_loss)
    assert check_flow_matching_loss(lambda m, x0, g: flow_matching_loss(m, x0, g, density="uniform"))
    assert "check_flow_matching_loss passed" in capsys.readouterr().out


def test_the_loss_check_names_the_wrong_target_and_the_backward_path():
    def sign(model, x0, generator):
        t = torch.rand(x0.shape[0], generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        return ((model((1 - tt) * x0 + tt * noise, t) - (x0 - noise)) ** 2).mean()

    def eps_target(model, x0, generator):
        t = torch.rand(x0.shape[0], generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        return ((model((1 - tt) * x0 + tt * noise, t) - noise) ** 2).mean()

    def backwards(model, x0, generator):
        t = torch.rand(x0.shape[0], generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        return ((model(tt * x0 + (1 - tt) * noise, t) - (noise - x0)) ** 2).mean()

    rejects(check_flow_matching_loss, sign, "the target points the wrong way")
    rejects(check_flow_matching_loss, eps_target, "the target is the noise")
    rejects(check_flow_matching_loss, backwards, "the path runs backwards")


def test_the_loss_check_sees_a_detached_loss_the_global_generator_and_an_in_place_change():
    def detached(model, x0, generator):
        return right_loss(model, x0, generator).detach()

    def global_rng(model, x0, generator):
        return right_loss(model, x0, torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))

    def in_place(model, x0, generator):
        loss = right_loss(model, x0, generator)
        x0.mul_(1.0001)
        return loss

    rejects(check_flow_matching_loss, detached, "carries no gradient back to the model")
    rejects(check_flow_matching_loss, global_rng, "not from torch's global random numbers")
    rejects(check_flow_matching_loss, in_place, "changed x0 in place")


def test_the_loss_check_points_to_the_hints_for_an_unknown_mistake():
    rejects_unrecognised(check_flow_matching_loss, lambda m, x0, g: 1.3 * right_loss(m, x0, g), "13.1")


def test_the_sampler_check_passes_the_reference_and_names_the_loop_mistakes():
    assert check_flow_sampler(sample_flow_euler)

    def loop(velocity, noise, times, sign=1.0, at_next=False, short=False):
        x = noise
        steps = len(times) - 1 - (1 if short else 0)
        for i in range(steps):
            t = times[i + 1] if at_next else times[i]
            x = x + sign * (times[i + 1] - times[i]) * velocity(x, t.expand(x.shape[0]))
        return x

    rejects(check_flow_sampler, lambda v, n, ts: loop(v, n, ts, sign=-1.0), "the steps go the wrong way")
    rejects(check_flow_sampler, lambda v, n, ts: loop(v, n, ts, at_next=True), "evaluated at the next time")
    rejects(check_flow_sampler, lambda v, n, ts: loop(v, n, ts, short=True), "the last step is missing")
    rejects_unrecognised(check_flow_sampler, lambda v, n, ts: loop(v, n, ts) * 0.9, "13.2")


def test_the_conversion_check_passes_the_algebra_and_names_swaps_and_signs():
    def mine(x_t, v, t):
        tt = t.reshape(-1, *([1] * (x_t.dim() - 1)))
        return x_t - tt * v, x_t + (1 - tt) * v

    assert check_velocity_to_x0_eps(mine)
    # the reference inverts the path: from (x0, eps) to (x_t, v) and back
    x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    x_t = (1 - t.view(-1, 1)) * x0 + t.view(-1, 1) * eps
    back = reference_velocity_to_x0_eps(x_t, eps - x0, t)
    torch.testing.assert_close(back[0], x0)
    torch.testing.assert_close(back[1], eps)
    rejects(check_velocity_to_x0_eps, lambda x_t, v, t: mine(x_t, v, t)[::-1], "the two outputs are swapped")
    rejects(check_velocity_to_x0_eps, lambda x_t, v, t: mine(x_t, v, 1 - t), "t and 1 − t are exchanged")
    rejects_unrecognised(check_velocity_to_x0_eps, lambda x_t, v, t: (x_t, v), "13.3")
