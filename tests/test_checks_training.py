"""The exercise checks of notebook 10 (training): the reference passes, plausible wrong ones are named.

The implementations below are written the way a learner would write them (not taken from the checks), so each
test shows that a real mistake produces a message pointing at it, and that right ones written differently pass.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd.course.checks import check_drop_captions, check_unet_training_loss, pick
from sd.course.checks.training import reference_drop_captions, reference_unet_training_loss
from tests.check_helpers import rejects


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
    (loss_alpha_bar_previous_step, ["alpha_bar is taken at t - 1"]),
    (loss_noise_drawn_first, ["the noise is drawn before t"]),
    (loss_global_rng, ["generators seeded alike", "generator=generator"]),
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
    (loss_weights_ignored, ["the weights are ignored", "weight[t]"]),
    (loss_weights_times_batch_mean, ["the weights multiply the batch's mean error"]),
    (loss_weights_not_reshaped, ["without a reshape", "broadcasts along the width"]),
    (loss_without_weight_parameter, ["unexpected keyword argument 'weight'", "optional last argument weight=None"]),
])
def test_unet_training_loss_check_names_the_weighting_mistakes(impl, fragments):
    rejects(check_unet_training_loss, impl, *fragments)


def test_unet_training_loss_check_explains_losses_that_cannot_train():
    rejects(check_unet_training_loss, lambda *a: _loss(*a, item=True), "should be a tensor", "loss.item()")
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


# ---------------------------------------------------------------------------------------------------------
# 10.2 caption dropout, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def drop_right(captions, generator, p=0.1):
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def drop_right_in_a_loop(captions, generator, p=0.1):
    """Right, written differently: one scalar draw per caption, in order."""
    out = []
    for caption in captions:
        out.append("" if torch.rand((), generator=generator).item() < p else caption)
    return out


def drop_with_probability_0_9(captions, generator, p=0.1):
    keep = torch.rand(len(captions), generator=generator) < p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def drop_whole_batch(captions, generator, p=0.1):
    if torch.rand(1, generator=generator).item() < p:
        return [""] * len(captions)
    return list(captions)


def drop_to_space(captions, generator, p=0.1):
    drop = torch.rand(len(captions), generator=generator) < p
    return [" " if d else c for c, d in zip(captions, drop.tolist())]


def drop_to_none(captions, generator, p=0.1):
    drop = torch.rand(len(captions), generator=generator) < p
    return [None if d else c for c, d in zip(captions, drop.tolist())]


def drop_in_place(captions, generator, p=0.1):
    drop = torch.rand(len(captions), generator=generator) < p
    for i, d in enumerate(drop.tolist()):
        if d:
            captions[i] = ""
    return captions


def drop_with_python_random(captions, generator, p=0.1):
    import random
    return ["" if random.random() < p else c for c in captions]


def test_drop_captions_check_passes_the_reference_and_right_variants(capsys):
    for impl in (reference_drop_captions, drop_right, drop_right_in_a_loop):
        assert check_drop_captions(impl)
    assert capsys.readouterr().out.count("✅ check_drop_captions passed") == 3


def test_reference_drop_captions_drops_where_a_uniform_draw_is_below_p():
    captions = [f"caption {i}" for i in range(2000)]
    got = reference_drop_captions(captions, torch.Generator().manual_seed(5), 0.1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(5))
    assert [c == "" for c in got] == (u < 0.1).tolist()
    assert 0.08 < sum(c == "" for c in got) / 2000 < 0.12
    assert all(g in ("", c) for g, c in zip(got, captions))


@pytest.mark.parametrize("impl, fragments", [
    (drop_with_probability_0_9, ["probability 1 - p"]),
    (drop_whole_batch, ["the whole batch is dropped or kept at once"]),
    (drop_to_space, ["a space"]),
    (drop_to_none, ["None", 'empty string ""']),
    (drop_in_place, ["changed the list it was given"]),
    (drop_with_python_random, ["generators seeded alike"]),
])
def test_drop_captions_check_names_the_mistake(impl, fragments):
    rejects(check_drop_captions, impl, *fragments)


def test_drop_captions_check_wants_the_list_the_exercise_returns_not_a_tuple():
    def drop_as_tuple(captions, generator, p):
        return tuple(drop_right(captions, generator, p))

    rejects(check_drop_captions, drop_as_tuple, "should be a list of", "got a tuple of")


def test_pick_goes_on_with_the_reference_when_the_learner_is_stuck(capsys):
    def stuck(captions, generator, p=0.1):
        raise NotImplementedError("Exercise 10.2: draw one number per caption")

    assert pick(check_drop_captions, stuck, reference=reference_drop_captions) is reference_drop_captions
    assert pick(check_drop_captions, drop_right, reference=reference_drop_captions) is drop_right
    out = capsys.readouterr().out
    assert "not done yet" in out and "using the reference" in out
