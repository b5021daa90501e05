"""The exercise checks of the editing notebook: the references are what sd and diffusers compute, mistakes are named.

The inpainting loop with a toy noise predictor must give `sd.editing.inpaint.inpaint`'s latents, and its blend must
be diffusers' inpainting blend (`add_noise` at the next timestep); the inversion loop must give
`sd.editing.inversion.invert`'s noise, and each of its steps must be diffusers' DDIMInverseScheduler.step configured
like SD v1.5; slerp's check passes sd's own slerp and an independent float32 one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import sd
from sd.course.checks import check_inpainting_loop, check_inversion_loop, check_slerp, pick
from sd.course.checks.editing import reference_ddim_inversion, reference_inpainting_loop
from sd.editing.inpaint import inpaint, latent_mask, mask_to_tensor
from sd.editing.interpolation import slerp
from sd.editing.inversion import invert
from sd.images import SIGNED, to_pil
from sd.samplers import ddim_step, predict_x0, q_sample
from sd.training.data import ShapesDataset
from tests.check_helpers import rejects, rejects_unrecognised

SIZE = 32    # the shipped model's native size
STEPS = 10
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


class ToyUNet(torch.nn.Module):
    """A noise predictor that depends on the latent and the timestep, so that every step matters."""

    def __init__(self, config):
        super().__init__()
        self.config = config        # the sizes the pipeline reads

    def forward(self, x, context, t):
        return torch.tanh(x) * 0.5 + float(t) / 1000


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = sd.load_checkpoint()
    pipe.unet = ToyUNet(pipe.unet.config)
    return pipe


@pytest.fixture(scope="module")
def picture():
    data = ShapesDataset(length=1, image_size=SIZE, seed=1)
    return to_pil(data.pixels(0)[None], SIGNED)[0]


def _toy_eps(pipe):
    return lambda x, t: pipe.unet(x, None, t)


# ---------------------------------------------------------------------------------------------------------
# The references are what sd and diffusers compute
# ---------------------------------------------------------------------------------------------------------

def test_reference_inpainting_loop_gives_sd_inpaint_latents(toy_pipe, picture):
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[8:24, 16:] = 1                                                         # repaint a block on the right
    got = inpaint(toy_pipe, "x", picture, mask, num_inference_steps=STEPS, guidance_scale=1.0, seed=3,
                  output_type="latent", progress=False)
    original = toy_pipe.encoder(toy_pipe.image_to_tensor(picture))             # (1, 4, 8, 8)
    repaint = latent_mask(mask_to_tensor(mask, (SIZE, SIZE), (SIZE, SIZE)), toy_pipe.vae_factor)
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(3))
    levels = toy_pipe.scheduler.noise_levels(STEPS, "ddim")
    x = reference_inpainting_loop(_toy_eps(toy_pipe), noise, original, repaint, levels.timesteps, levels.alpha_bars)
    torch.testing.assert_close(x, got, atol=1e-6, rtol=1e-5)
    assert torch.equal(x[repaint.expand_as(x) == 0], original.expand_as(x)[repaint.expand_as(x) == 0])
    assert (x - original)[repaint.expand_as(x) == 1].abs().mean() > 0.1        # the white part did change


def test_reference_inpainting_loop_is_diffusers_ddim_with_its_inpainting_blend():
    """diffusers' DDIMScheduler.step, then its blend (add_noise at the next timestep; the original after the last)."""
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps                                             # 901, 801, ..., 1
    alpha_bars = torch.cat([scheduler.alphas_cumprod[timesteps], scheduler.alphas_cumprod[:1]])
    torch.manual_seed(0)
    noise, original = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = (torch.rand(1, 1, 8, 8) > 0.5).float()
    eps_fn = lambda x, t: torch.tanh(x) * 0.5 + float(t) / 1000                 # noqa: E731
    x = noise
    for k, t in enumerate(timesteps):
        x = scheduler.step(eps_fn(x, t), t, x).prev_sample
        known = (scheduler.add_noise(original.expand_as(x), noise, timesteps[k + 1:k + 2]) if k + 1 < STEPS
                 else original)
        x = (1 - mask) * known + mask * x
    got = reference_inpainting_loop(eps_fn, noise, original, mask, timesteps, alpha_bars)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_reference_inversion_loop_gives_sd_invert(toy_pipe, picture):
    got = invert(toy_pipe, picture, "x", num_inference_steps=STEPS, progress=False)
    x0 = toy_pipe.encoder(toy_pipe.image_to_tensor(picture))                   # (1, 4, 8, 8)
    levels = toy_pipe.scheduler.noise_levels(STEPS, "ddim")
    x = reference_ddim_inversion(_toy_eps(toy_pipe), x0, levels.timesteps, levels.alpha_bars)
    torch.testing.assert_close(x, got, atol=1e-6, rtol=1e-5)


def test_reference_inversion_loop_is_diffusers_ddim_inverse_scheduler():
    """diffusers' DDIMInverseScheduler (SD's settings) walks 1, 101, ..., 901 and steps up with eps at each t."""
    scheduler = DDIMInverseScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(STEPS)                     # ascending: 1, 101, ..., 901
    eps_fn = lambda x, t: torch.tanh(x) * 0.5 + float(t) / 1000                 # noqa: E731
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 6, 6)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t), t, x).prev_sample
    levels = sd.DiffusionScheduler().noise_levels(STEPS, "ddim")
    torch.testing.assert_close(reference_ddim_inversion(eps_fn, x0, levels.timesteps, levels.alpha_bars), x,
                               atol=1e-5, rtol=1e-5)


def test_reference_inversion_undoes_ddim_for_a_noise_prediction_that_ignores_the_latent():
    """With eps independent of x the approximation is exact: DDIM from the inverted x_T gives x0 back."""
    eps_fn = lambda x, t: torch.full_like(x, 0.3) + float(t) / 2000            # noqa: E731
    torch.manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8)
    levels = sd.DiffusionScheduler().noise_levels(STEPS, "ddim")
    x = reference_ddim_inversion(eps_fn, x0, levels.timesteps, levels.alpha_bars)
    assert (x - x0).abs().mean() > 0.1
    for i in range(STEPS):
        x, _ = ddim_step(x, eps_fn(x, levels.timesteps[i]), levels.alpha_bars[i], levels.alpha_bars[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

def my_inpainting_loop(eps_fn, noise, original, mask, timesteps, alpha_bars):
    """Written out: x_0 predicted, then eq. 12; the blend with torch.where."""
    x = noise
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, t)
        a_t, a_next = alpha_bars[i], alpha_bars[i + 1]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        level = a_next if i < len(timesteps) - 1 else torch.tensor(1.0)
        x = torch.where(mask.bool(), x, level.sqrt() * original + (1 - level).sqrt() * noise)
    return x


def my_inversion_loop(eps_fn, x0, timesteps, alpha_bars):
    """The step as Mokady et al. 2023 write it, over the steps listed from the clean end."""
    x = x0
    for i in range(len(timesteps) - 1, -1, -1):
        eps = eps_fn(x, timesteps[i])
        a_t, a_next = alpha_bars[i + 1], alpha_bars[i]
        x = (a_next / a_t).sqrt() * x + a_next.sqrt() * ((1 / a_next - 1).sqrt() - (1 / a_t - 1).sqrt()) * eps
    return x


def my_slerp(a, b, t):
    """float32 throughout, with the community's fallback threshold on cos (0.9995)."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    if cos.abs() > 0.9995:
        return (1 - t) * a + t * b
    w = torch.arccos(cos)
    return (torch.sin((1 - t) * w) * a + torch.sin(t * w) * b) / torch.sin(w)


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_inpainting_loop(reference_inpainting_loop) and check_inpainting_loop(my_inpainting_loop)
    assert check_inversion_loop(reference_ddim_inversion) and check_inversion_loop(my_inversion_loop)
    assert check_slerp(slerp) and check_slerp(my_slerp)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Done wrong: each typical mistake is named; an unknown one is described without code
# ---------------------------------------------------------------------------------------------------------

def _inpainting(kind):
    """A learner's loop with one typical mistake."""
    def loop(eps_fn, noise, original, mask, timesteps, alpha_bars):
        n = len(timesteps)
        x = noise
        for i in range(n):
            if kind == "blend_first":
                x = mask * x + (1 - mask) * (alpha_bars[i].sqrt() * original + (1 - alpha_bars[i]).sqrt() * noise)
            eps = eps_fn(x, timesteps[i])
            x = ddim_step(x, eps, alpha_bars[i], alpha_bars[i + 1])[0]
            if kind == "blend_first":
                continue
            level = {"start_level": alpha_bars[i], "last_not_clean": alpha_bars[i + 1]}.get(
                kind, alpha_bars[i + 1] if i + 1 < n else torch.tensor(1.0))
            source = eps if kind == "predicted_noise" else noise
            known = original if kind == "clean" else level.sqrt() * original + (1 - level).sqrt() * source
            if kind == "no_sqrt":
                known = level * original + (1 - level) * noise
            x = (1 - mask) * x + mask * known if kind == "inverted" else mask * x + (1 - mask) * known
        return x
    return loop


@pytest.mark.parametrize("kind, mistake", [
    ("inverted", "the mask is the wrong way round"),
    ("clean", "the clean original latents at every step"),
    ("start_level", "noised to the level the step starts from"),
    ("last_not_clean", "after the last step the kept region is still noised"),
    ("blend_first", "the blend comes before the step"),
    ("predicted_noise", "noised with the step's predicted noise"),
    ("no_sqrt", "without the square roots"),
])
def test_check_inpainting_loop_names_the_mistake(kind, mistake):
    rejects(check_inpainting_loop, _inpainting(kind), "check_inpainting_loop failed", "Hint: ", mistake)


def test_check_inpainting_loop_rejects_an_unknown_mistake_without_code():
    def fresh_noise_at_every_step(eps_fn, noise, original, mask, timesteps, alpha_bars):
        x = noise
        generator = torch.Generator().manual_seed(5)
        for i in range(len(timesteps)):
            x = ddim_step(x, eps_fn(x, timesteps[i]), alpha_bars[i], alpha_bars[i + 1])[0]
            level = alpha_bars[i + 1] if i + 1 < len(timesteps) else torch.tensor(1.0)
            fresh = torch.randn(noise.shape, generator=generator)
            x = mask * x + (1 - mask) * (level.sqrt() * original + (1 - level).sqrt() * fresh)
        return x

    rejects_unrecognised(check_inpainting_loop, fresh_noise_at_every_step, "11.1")


def _inversion(kind):
    def loop(eps_fn, x0, timesteps, alpha_bars):
        n = len(timesteps)
        x = x0
        order = range(n) if kind == "forward" else range(n - 1, 0 if kind == "early_stop" else -1, -1)
        for i in order:
            t = (timesteps[i + 1] if i + 1 < n else torch.tensor(0)) if kind == "start_timestep" else timesteps[i]
            low = torch.tensor(1.0) if kind == "from_one" and i == n - 1 else alpha_bars[i + 1]
            high = alpha_bars[i]
            if kind == "swapped":
                low, high = high, low
            x = q_sample(predict_x0(x, eps_fn(x, t), low), eps_fn(x, t), high)
        return x
    return loop


@pytest.mark.parametrize("kind, mistake", [
    ("forward", "undone in the sampler's order"),
    ("swapped", "each step goes down in noise"),
    ("start_timestep", "predicted at the timestep of the level the latent sits at"),
    ("early_stop", "stops one step early"),
    ("from_one", "taken to be at alpha_bar = 1"),
])
def test_check_inversion_loop_names_the_mistake(kind, mistake):
    rejects(check_inversion_loop, _inversion(kind), "check_inversion_loop failed", "Hint: ", mistake)


def test_check_inversion_loop_rejects_an_unknown_mistake_without_code():
    def noise_predicted_once(eps_fn, x0, timesteps, alpha_bars):
        eps = eps_fn(x0, timesteps[-1])
        x = x0
        for i in reversed(range(len(timesteps))):
            x = q_sample(predict_x0(x, eps, alpha_bars[i + 1]), eps, alpha_bars[i])
        return x

    rejects_unrecognised(check_inversion_loop, noise_predicted_once, "11.2")


def slerp_is_lerp(a, b, t):
    return (1 - t) * a + t * b


def slerp_without_fallback(a, b, t):
    w = torch.arccos(((a * b).sum() / (a.norm() * b.norm())).clamp(-1, 1))
    return (torch.sin((1 - t) * w) * a + torch.sin(t * w) * b) / torch.sin(w)


def slerp_unnormalised_angle(a, b, t):
    w = torch.arccos((a * b).sum())
    return (torch.sin((1 - t) * w) * a + torch.sin(t * w) * b) / torch.sin(w)


def slerp_t_at_the_wrong_end(a, b, t):
    w = torch.arccos((a * b).sum() / (a.norm() * b.norm()))
    return (torch.sin(t * w) * a + torch.sin((1 - t) * w) * b) / torch.sin(w)


def slerp_without_the_division(a, b, t):
    w = torch.arccos((a * b).sum() / (a.norm() * b.norm()))
    return torch.sin((1 - t) * w) * a + torch.sin(t * w) * b


def slerp_per_item(a, b, t):
    return torch.stack([slerp(x, y, t) for x, y in zip(a, b)])


@pytest.mark.parametrize("impl, mistake", [
    (slerp_is_lerp, "plain linear interpolation"),
    (slerp_without_fallback, "no fallback for parallel vectors"),
    (slerp_unnormalised_angle, "dot product of unnormalised vectors"),
    (slerp_t_at_the_wrong_end, "t is applied to the wrong end"),
    (slerp_without_the_division, "the division by sin(w) is missing"),
    (slerp_per_item, "per item of the first dimension"),
])
def test_check_slerp_names_the_mistake(impl, mistake):
    rejects(check_slerp, impl, "check_slerp failed", "Hint: ", mistake)


def test_check_slerp_rejects_an_unknown_mistake_without_code():
    def slerp_on_unit_vectors(a, b, t):          # normalises the ends: the norms are not interpolated
        return slerp(a / a.norm(), b / b.norm(), t) * a.norm()

    rejects_unrecognised(check_slerp, slerp_on_unit_vectors, "11.3")


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(eps_fn, noise, original, mask, timesteps, alpha_bars):
        raise NotImplementedError("Exercise 11.1: the inpainting loop")

    assert pick(check_inpainting_loop, stub, reference=reference_inpainting_loop) is reference_inpainting_loop
    assert "not done yet" in capsys.readouterr().out
