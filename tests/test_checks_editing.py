"""The exercise checks of the editing notebook: the references are what sd and diffusers compute, mistakes are named.

The blend in a sampling loop with a toy noise predictor must give `sd.editing.inpaint.inpaint`'s latents, and one
blend must be diffusers' inpainting blend (`add_noise` at the next timestep); the inversion step in a loop must give
`sd.editing.inversion.invert`'s noise, and one step must be diffusers' DDIMInverseScheduler.step configured like
SD v1.5; slerp's check passes sd's own slerp and an independent float32 one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import sd
from sd.course.checks import check_blend_latents, check_ddim_inversion_step, check_slerp, pick
from sd.course.checks.editing import reference_blend_latents, reference_ddim_inversion_step
from sd.editing.inpaint import inpaint, latent_mask, mask_to_tensor
from sd.editing.interpolation import slerp
from sd.editing.inversion import invert
from sd.images import SIGNED, to_pil
from sd.samplers import ddim_step
from sd.training.data import ShapesDataset
from tests.check_helpers import rejects

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


# ---------------------------------------------------------------------------------------------------------
# The references are what sd and diffusers compute
# ---------------------------------------------------------------------------------------------------------

def test_reference_blend_in_a_ddim_loop_gives_sd_inpaint_latents(toy_pipe, picture):
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[8:24, 16:] = 1                                                         # repaint a block on the right
    got = inpaint(toy_pipe, "x", picture, mask, num_inference_steps=STEPS, guidance_scale=1.0, seed=3,
                  output_type="latent", progress=False)
    original = toy_pipe.encoder(toy_pipe.image_to_tensor(picture))             # (1, 4, 8, 8)
    repaint = latent_mask(mask_to_tensor(mask, (SIZE, SIZE), (SIZE, SIZE)), toy_pipe.vae_factor)
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(3))
    levels = toy_pipe.scheduler.noise_levels(STEPS, "ddim")
    x = noise
    for i in range(STEPS):
        eps = toy_pipe.unet(x, None, levels.timesteps[i])
        x, _ = ddim_step(x, eps, levels.alpha_bars[i], levels.alpha_bars[i + 1])
        alpha_bar_next = levels.alpha_bars[i + 1] if i + 1 < STEPS else torch.tensor(1.0)   # clean at the end
        x = reference_blend_latents(x, original, noise, repaint, alpha_bar_next)
    torch.testing.assert_close(x, got, atol=1e-6, rtol=1e-5)
    assert (x - original)[repaint.expand_as(x) == 1].abs().mean() > 0.1        # the white part did change


def test_reference_blend_is_diffusers_inpainting_blend():
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(STEPS)
    torch.manual_seed(0)
    x, original, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = (torch.rand(1, 1, 8, 8) > 0.5).float()
    t_next = scheduler.timesteps[4]
    expected = (1 - mask) * scheduler.add_noise(original, noise, torch.tensor([t_next])) + mask * x
    got = reference_blend_latents(x, original, noise, mask, scheduler.alphas_cumprod[t_next])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_reference_inversion_step_in_a_loop_gives_sd_invert(toy_pipe, picture):
    got = invert(toy_pipe, picture, "x", num_inference_steps=STEPS, progress=False)
    x = toy_pipe.encoder(toy_pipe.image_to_tensor(picture))                    # (1, 4, 8, 8)
    levels = toy_pipe.scheduler.noise_levels(STEPS, "ddim")
    for i in reversed(range(STEPS)):       # sampling's step i undone: from alpha_bars[i + 1] up to alpha_bars[i]
        eps = toy_pipe.unet(x, None, levels.timesteps[i])
        x = reference_ddim_inversion_step(x, eps, levels.alpha_bars[i + 1], levels.alpha_bars[i])
    torch.testing.assert_close(x, got, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 4, STEPS - 1])
def test_reference_inversion_step_is_diffusers_ddim_inverse_step(index):
    scheduler = DDIMInverseScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(STEPS)                     # ascending: 1, 101, ..., 901
    t = int(scheduler.timesteps[index])
    low = t - 1000 // STEPS
    torch.manual_seed(index)
    x, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    expected = scheduler.step(eps, t, x).prev_sample
    alpha_bar_low = scheduler.alphas_cumprod[low] if low >= 0 else scheduler.alphas_cumprod[0]
    got = reference_ddim_inversion_step(x, eps, alpha_bar_low, scheduler.alphas_cumprod[t])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_inversion_step_undoes_a_ddim_step_for_the_same_eps():
    torch.manual_seed(1)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    alphas = sd.DiffusionScheduler().alphas_cumprod
    up = reference_ddim_inversion_step(x, eps, alphas[481], alphas[501])
    down, _ = ddim_step(up, eps, alphas[501], alphas[481])
    torch.testing.assert_close(down, x, atol=1e-5, rtol=1e-5)
    assert (up - x).abs().mean() > 0.01


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

def my_blend(x, original, noise, mask, alpha_bar_next):
    known = alpha_bar_next.sqrt() * original + (1 - alpha_bar_next).sqrt() * noise
    return torch.where(mask.bool(), x, known)


def my_inversion_step(x_t, eps, alpha_bar_t, alpha_bar_next):
    # the step as Mokady et al. 2023 write it:
    # sqrt(a_next / a_t) x_t + sqrt(a_next) (sqrt(1 / a_next - 1) - sqrt(1 / a_t - 1)) eps
    ratio = (alpha_bar_next / alpha_bar_t).sqrt()
    return ratio * x_t + alpha_bar_next.sqrt() * ((1 / alpha_bar_next - 1).sqrt() - (1 / alpha_bar_t - 1).sqrt()) * eps


def my_slerp(a, b, t):
    """float32 throughout, with the community's fallback threshold on cos (0.9995)."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    if cos.abs() > 0.9995:
        return (1 - t) * a + t * b
    w = torch.arccos(cos)
    return (torch.sin((1 - t) * w) * a + torch.sin(t * w) * b) / torch.sin(w)


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_blend_latents(reference_blend_latents) and check_blend_latents(my_blend)
    assert check_ddim_inversion_step(reference_ddim_inversion_step) and check_ddim_inversion_step(my_inversion_step)
    assert check_slerp(slerp) and check_slerp(my_slerp)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Done wrong: each typical mistake is named
# ---------------------------------------------------------------------------------------------------------

def _noised(original, noise, alpha_bar):
    return alpha_bar.sqrt() * original + (1 - alpha_bar).sqrt() * noise


def blend_inverted(x, original, noise, mask, alpha_bar_next):
    return mask * _noised(original, noise, alpha_bar_next) + (1 - mask) * x


def blend_clean_original(x, original, noise, mask, alpha_bar_next):
    return mask * x + (1 - mask) * original


def blend_without_square_roots(x, original, noise, mask, alpha_bar_next):
    return mask * x + (1 - mask) * (alpha_bar_next * original + (1 - alpha_bar_next) * noise)


def blend_weights_swapped(x, original, noise, mask, alpha_bar_next):
    return mask * x + (1 - mask) * ((1 - alpha_bar_next).sqrt() * original + alpha_bar_next.sqrt() * noise)


def blend_noise_only(x, original, noise, mask, alpha_bar_next):
    return mask * x + (1 - mask) * noise


@pytest.mark.parametrize("impl, mistake", [
    (blend_inverted, "the mask is the wrong way round"),
    (blend_noise_only, "the kept region gets the noise alone"),
    (blend_clean_original, "the kept region gets the clean original latents"),
    (blend_without_square_roots, "noised without the square roots"),
    (blend_weights_swapped, "the two weights of the noising are swapped"),
])
def test_check_blend_latents_names_the_mistake(impl, mistake):
    rejects(check_blend_latents, impl, "check_blend_latents failed", "Hint: ", mistake)


def inversion_ordinary_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next):
    return ddim_step(x_t, eps, alpha_bar_next, alpha_bar_t)[0]


def inversion_returns_a_tuple(x_t, eps, alpha_bar_t, alpha_bar_next):
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps, x0


def inversion_returns_x0(x_t, eps, alpha_bar_t, alpha_bar_next):
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def inversion_without_square_roots(x_t, eps, alpha_bar_t, alpha_bar_next):
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    return alpha_bar_next * x0 + (1 - alpha_bar_next) * eps


def inversion_x0_without_square_root(x_t, eps, alpha_bar_t, alpha_bar_next):
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps


def inversion_without_the_noise_term(x_t, eps, alpha_bar_t, alpha_bar_next):
    return alpha_bar_next.sqrt() * (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


@pytest.mark.parametrize("impl, mistake", [
    (inversion_x0_without_square_root, "predicted x_0 divides by alpha_bar_t"),
    (inversion_without_the_noise_term, "the noise term is missing"),
    (inversion_ordinary_ddim_step, "alpha_bar_t and alpha_bar_next are swapped"),
    (inversion_returns_a_tuple, "returns a tuple"),
    (inversion_returns_x0, "this is the predicted x_0"),
    (inversion_without_square_roots, "the square roots are missing"),
])
def test_check_ddim_inversion_step_names_the_mistake(impl, mistake):
    rejects(check_ddim_inversion_step, impl, "check_ddim_inversion_step failed", "Hint: ", mistake)


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


@pytest.mark.parametrize("impl, mistake", [
    (slerp_is_lerp, "plain linear interpolation"),
    (slerp_without_fallback, "no fallback for parallel vectors"),
    (slerp_unnormalised_angle, "dot product of unnormalised vectors"),
    (slerp_t_at_the_wrong_end, "t is applied to the wrong end"),
    (slerp_without_the_division, "the division by sin(w) is missing"),
])
def test_check_slerp_names_the_mistake(impl, mistake):
    rejects(check_slerp, impl, "check_slerp failed", "Hint: ", mistake)


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(x, original, noise, mask, alpha_bar_next):
        raise NotImplementedError("Exercise 11.1: the blend")

    assert pick(check_blend_latents, stub, reference=reference_blend_latents) is reference_blend_latents
    assert "not done yet" in capsys.readouterr().out
