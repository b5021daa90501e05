"""The exercise checks of notebook 10 (training): the reference passes, plausible wrong ones are named, the loss's
behaviour (gradients, random numbers, inputs) and the step's (dropout, optimizer, gradients) are checked, and a
wrong answer the checks do not know gets a message in words that points to the hints.

The implementations below are written the way a learner would write them (not taken from the checks), so each
test shows that a real mistake produces a message pointing at it, and that right ones written differently pass.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd.course.checks import check_training_step, check_unet_training_loss, pick
from sd.course.checks.training import (reference_drop_captions, reference_training_step,
                                       reference_unet_training_loss)
from tests.check_helpers import program_text, rejects, rejects_unrecognised


# ---------------------------------------------------------------------------------------------------------
# 10.1 the UNet's training loss, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def loss_right(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
    """Right, written differently: indexing with None, an explicit squared error, the weights per element."""
    z0 = latents * latent_scale
    t = torch.randint(0, alphas_cumprod.shape[0], (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t][:, None, None, None]
    z_t = torch.sqrt(a) * z0 + torch.sqrt(1 - a) * noise
    squared = (unet(z_t, context, t) - noise) ** 2
    if weight is not None:
        squared = squared * weight[t][:, None, None, None]
    return squared.mean()


def _loss(unet, latents, context, alphas_cumprod, latent_scale, generator, *, target="noise", low=0, high=None,
          scale=True, noise_first=False, sqrt=True, shift=0, detach=False, item=False, per_sample=False,
          weight=None, weighting="right"):
    z0 = latents * latent_scale if scale else latents
    high = len(alphas_cumprod) if high is None else high
    if noise_first:
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(low, high, (len(z0),), generator=generator)
    else:
        t = torch.randint(low, high, (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t + shift].view(-1, 1, 1, 1)
    z_t = (a.sqrt() * z0 + (1 - a).sqrt() * noise) if sqrt else (a * z0 + (1 - a) * noise)
    pred = unet(z_t, context, t)
    if detach:
        pred = pred.detach()
    goal = {"noise": noise, "x0": z0, "z_t": z_t}[target]
    errors = ((pred - goal) ** 2).mean(dim=(1, 2, 3))                  # (B,)
    if weight is not None and weighting == "right":
        errors = errors * weight[t]
    loss = errors if per_sample else errors.mean()
    if weight is not None and weighting == "batch_mean":
        loss = weight[t].mean() * F.mse_loss(pred, goal)
    if weight is not None and weighting == "broadcast":
        loss = ((pred - goal) ** 2 * weight[t]).mean()
    return loss.item() if item else loss


def loss_predicts_x0(*args, **kwargs):
    return _loss(*args, target="x0", **kwargs)


def loss_t_from_1_to_1000(*args, **kwargs):
    return _loss(*args, low=1, high=len(args[3]) + 1, **kwargs)


def loss_against_noisy_latent(*args, **kwargs):
    return _loss(*args, target="z_t", **kwargs)


def loss_without_latent_scale(*args, **kwargs):
    return _loss(*args, scale=False, **kwargs)


def loss_alpha_bar_without_sqrt(*args, **kwargs):
    return _loss(*args, sqrt=False, **kwargs)


def loss_alpha_bar_previous_step(*args, **kwargs):
    return _loss(*args, shift=-1, **kwargs)


def loss_noise_drawn_first(*args, **kwargs):
    return _loss(*args, noise_first=True, **kwargs)


def loss_global_rng(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
    z0 = latents * latent_scale
    t = torch.randint(0, len(alphas_cumprod), (len(z0),))          # the generator is forgotten
    noise = torch.randn_like(z0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, context, t), noise)


def loss_hardcoded_1000(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
    z0 = latents * latent_scale
    t = torch.randint(0, 1000, (len(z0),), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, context, t), noise)


def test_unet_training_loss_check_passes_the_reference_and_a_right_variant(capsys):
    assert check_unet_training_loss(reference_unet_training_loss)
    assert check_unet_training_loss(loss_right)
    assert capsys.readouterr().out.count("✅ check_unet_training_loss passed") == 2


@pytest.mark.parametrize("impl, fragments", [
    (loss_predicts_x0, ["predicts the NOISE"]),
    (loss_t_from_1_to_1000, ["t is drawn from [1, T]"]),
    (loss_against_noisy_latent, ["the target is the noisy latent z_t"]),
    (loss_without_latent_scale, ["not multiplied by latent_scale"]),
    (loss_alpha_bar_without_sqrt, ["square roots are missing"]),
    (loss_alpha_bar_previous_step, ["ᾱ is taken at t − 1"]),
    (loss_noise_drawn_first, ["the noise is drawn before t"]),
    (loss_global_rng, ["generators seeded alike", "from the generator you are given"]),
    (loss_hardcoded_1000, ["IndexError", "don't assume T = 1000"]),
])
def test_unet_training_loss_check_names_the_mistake(impl, fragments):
    rejects(check_unet_training_loss, impl, *fragments)


def loss_weights_ignored(*args, **kwargs):
    return _loss(*args, **kwargs, weighting="ignored")


def loss_weights_times_batch_mean(*args, **kwargs):
    return _loss(*args, **kwargs, weighting="batch_mean")


def loss_weights_not_reshaped(*args, **kwargs):
    return _loss(*args, **kwargs, weighting="broadcast")


def loss_without_weight_parameter(unet, latents, context, alphas_cumprod, latent_scale, generator):
    return _loss(unet, latents, context, alphas_cumprod, latent_scale, generator)


@pytest.mark.parametrize("impl, fragments", [
    (loss_weights_ignored, ["the weights are ignored", "the weight of its own timestep"]),
    (loss_weights_times_batch_mean, ["the weights multiply the batch's mean error"]),
    (loss_weights_not_reshaped, ["without a reshape", "broadcast along the width"]),
    (loss_without_weight_parameter, ["unexpected keyword argument 'weight'", "optional last argument, weight"]),
])
def test_unet_training_loss_check_names_the_weighting_mistakes(impl, fragments):
    rejects(check_unet_training_loss, impl, *fragments)


def test_unet_training_loss_check_explains_losses_that_cannot_train():
    rejects(check_unet_training_loss, lambda *a: _loss(*a, item=True), "should be a tensor", "not its value")
    rejects(check_unet_training_loss, lambda *a: _loss(*a, per_sample=True), "should be one number", "shape (4,)")
    rejects(check_unet_training_loss, lambda *a: _loss(*a, detach=True), "carries no gradient")


def test_unet_training_loss_check_compares_gradients_not_only_the_loss():
    def half_detached(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
        # the same value, but only half of the batch sends gradients into the UNet
        z0 = latents * latent_scale
        t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, context, t)
        b = len(z0) // 2
        pred = torch.cat([pred[:b], pred[b:].detach()])
        return F.mse_loss(pred, noise)

    rejects(check_unet_training_loss, half_detached, "the loss is right but the gradients")


def test_unet_training_loss_check_messages_are_words_not_code():
    for impl in (loss_predicts_x0, loss_t_from_1_to_1000, loss_without_latent_scale, loss_alpha_bar_without_sqrt,
                 loss_weights_times_batch_mean, loss_weights_not_reshaped, loss_global_rng):
        with pytest.raises(AssertionError) as info:
            check_unet_training_loss(impl)
        assert program_text(str(info.value)) is None, str(info.value)


def test_unet_training_loss_check_points_an_unknown_mistake_to_the_hints():
    """The noise scaled by 0.9: a loss the check does not know, told in words."""
    def noise_too_small(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
        z0 = latents * latent_scale
        t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=generator)
        noise = 0.9 * torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, context, t), noise)

    rejects_unrecognised(check_unet_training_loss, noise_too_small, "10.1")


# behaviour: what the loss does besides its value

def loss_calls_backward(*args, **kwargs):
    loss = loss_right(*args, **kwargs)
    loss.backward(retain_graph=True)
    return loss


def loss_scales_latents_in_place(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
    latents.mul_(latent_scale)                      # the caller's tensor is scaled too
    return loss_right(unet, latents, context, alphas_cumprod, 1.0, generator, weight)


def loss_with_a_spare_global_draw(*args, **kwargs):
    torch.rand(1)                                   # e.g. a leftover debugging draw: the global generator moves
    return loss_right(*args, **kwargs)


def loss_that_unfreezes_the_text_states(unet, latents, context, alphas_cumprod, latent_scale, generator,
                                        weight=None):
    context.requires_grad_(True)
    return loss_right(unet, latents, context, alphas_cumprod, latent_scale, generator, weight)


@pytest.mark.parametrize("impl, fragment", [
    (loss_calls_backward, "it ran the backward pass itself"),
    (loss_scales_latents_in_place, "changed its input latents in place"),
    (loss_with_a_spare_global_draw, "from torch's global generator"),
    (loss_that_unfreezes_the_text_states, "the context (an output of the frozen VAE or text encoder) now require"),
])
def test_unet_training_loss_check_rejects_a_right_value_with_wrong_behaviour(impl, fragment):
    message = rejects(check_unet_training_loss, impl, fragment)
    assert program_text(message) is None, message


def test_unet_training_loss_check_wants_a_gradient_in_every_weight():
    """A prediction whose time embedding is computed without gradients leaves time_proj without any."""
    def time_detached(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None):
        z0 = latents * latent_scale
        t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            full = unet(z_t, context, t)
            without_conv = full - unet.conv(z_t)
        pred = unet.conv(z_t) + without_conv
        return F.mse_loss(pred, noise)

    rejects(check_unet_training_loss, time_detached, "the gradients in the UNet's weights differ")


# ---------------------------------------------------------------------------------------------------------
# 10.2 one training step with caption dropout, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def step_right(unet, optimizer, loss_fn, means, logvars, captions, encode, generator, p=0.1, mistake=None):
    """Right, written differently: the dropout in a loop of scalar draws; the std from the log-variance by sqrt."""
    eps = None if mistake == "dropout_first" else torch.randn(means.shape, generator=generator)
    out = []
    draws = []
    if mistake == "whole_batch":
        u = torch.rand(1, generator=generator).item()
        draws = [u] * len(captions)
    else:
        draws = [torch.rand((), generator=generator).item() for _ in captions]
    if eps is None:
        eps = torch.randn(means.shape, generator=generator)
    for caption, u in zip(captions, draws):
        dropped = (u >= p) if mistake == "one_minus_p" else (u < p)
        out.append({"space": " ", "none": None}.get(mistake, "") if dropped else caption)
    if mistake == "in_place":
        captions[:] = out
    std = torch.sqrt(torch.exp(logvars))
    if mistake == "exp_logvar":
        std = torch.exp(logvars)
    latents = means if mistake == "mean_only" else means + std * eps
    context = encode(captions if mistake == "no_dropout" else out)
    if mistake == "zeros":
        context = encode(captions)
        for j, c in enumerate(out):
            if c == "":
                context[j] = 0
    loss = loss_fn(unet, latents, context, generator)
    if mistake != "no_zero_grad":
        optimizer.zero_grad()
    loss.backward()
    if mistake != "no_step":
        optimizer.step()
    return loss if mistake == "tensor" else loss.item()


def step_with(mistake):
    return lambda *args: step_right(*args, mistake=mistake)


def test_training_step_check_passes_the_reference_and_a_right_variant(capsys):
    assert check_training_step(reference_training_step)
    assert check_training_step(step_right)
    assert capsys.readouterr().out.count("✅ check_training_step passed") == 2


def test_reference_drop_captions_drops_where_a_uniform_draw_is_below_p():
    captions = [f"caption {i}" for i in range(2000)]
    got = reference_drop_captions(captions, torch.Generator().manual_seed(5), 0.1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(5))
    assert [c == "" for c in got] == (u < 0.1).tolist()
    assert 0.08 < sum(c == "" for c in got) / 2000 < 0.12
    assert all(g in ("", c) for g, c in zip(got, captions))


@pytest.mark.parametrize("mistake, fragments", [
    ("one_minus_p", ["probability 1 − p"]),
    ("whole_batch", ["for the whole batch"]),
    ("space", ["a space"]),
    ("none", ["None", 'empty string ""']),
    ("in_place", ["changed the captions it was given"]),
    ("no_dropout", ["no caption was dropped"]),
    ("zeros", ["text states are zeros", "empty caption"]),
    ("mean_only", ["the posterior means", "SAMPLE"]),
    ("exp_logvar", ["exp(logvar), the variance"]),
    ("dropout_first", ["drawn before the posterior's noise"]),
    ("no_step", ["the weights did not move"]),
    ("no_zero_grad", ["the first step is right but the second is not", "zero them"]),
    ("tensor", ["gives back a tensor"]),
])
def test_training_step_check_names_the_mistake(mistake, fragments):
    message = rejects(check_training_step, step_with(mistake), *fragments)
    assert program_text(message) is None, message


def test_training_step_check_sees_the_global_random_numbers():
    def step_with_python_random(unet, optimizer, loss_fn, means, logvars, captions, encode, generator, p=0.1):
        torch.randn(3)                                            # a draw from torch's global generator
        return reference_training_step(unet, optimizer, loss_fn, means, logvars, captions, encode, generator, p)

    rejects(check_training_step, step_with_python_random, "torch's global generator")


def test_training_step_check_points_an_unknown_mistake_to_the_hints():
    """The loss halved before the backward pass: the weights move half as far, a mistake the check does not know."""
    def half_step(unet, optimizer, loss_fn, means, logvars, captions, encode, generator, p=0.1):
        latents = means + torch.exp(0.5 * logvars) * torch.randn(means.shape, generator=generator)
        context = encode(reference_drop_captions(captions, generator, p))
        loss = loss_fn(unet, latents, context, generator)
        optimizer.zero_grad()
        (loss / 2).backward()
        optimizer.step()
        return loss.item()

    rejects_unrecognised(check_training_step, half_step, "10.2")


def test_pick_goes_on_with_the_reference_when_the_learner_is_stuck(capsys):
    def stuck(*args):
        raise NotImplementedError("Exercise 10.2: one training step")

    assert pick(check_training_step, stuck, reference=reference_training_step) is reference_training_step
    assert pick(check_training_step, step_right, reference=reference_training_step) is step_right
    out = capsys.readouterr().out
    assert "not done yet" in out and "using the reference" in out
