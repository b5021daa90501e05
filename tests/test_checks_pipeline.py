"""The exercise check of notebook 09 (text to image): a correct loop passes, plausible wrong loops are named.

The loops below are written the way a learner would write them (from the pipeline's parts, not from the check),
each with one typical mistake, switched on by a flag.
"""
from __future__ import annotations

import pytest
import torch

from sd.course.checks import check_text_to_image, pick
from sd.course.checks.pipeline import reference_text_to_image, tiny_pipeline
from sd.pipeline import StableDiffusion
from sd.samplers import SAMPLING_LOOPS


@torch.no_grad()
def learner_text_to_image(pipe, prompt, negative_prompt="", *, height, width, num_inference_steps, guidance_scale,
                          seed, sampler="ddim", mistake=None):
    generator = torch.Generator().manual_seed(seed)
    # the prompt and the negative prompt in one CLIP batch: [negative, prompt]
    texts = [negative_prompt if mistake != "always_empty_negative" else "", prompt]
    uncond, cond = pipe.clip(pipe.tokenizer(texts).to(pipe.device)).chunk(2)
    if mistake == "zeros":
        uncond = torch.zeros_like(cond)
    f = 8 if mistake == "factor_8" else pipe.vae_factor
    noise = torch.randn(1, 4, height // f, width // f, generator=generator)
    levels = pipe.scheduler.noise_levels(num_inference_steps, sampler)

    def predict_noise(x_t, t):
        out = pipe.unet(torch.cat([x_t] * 2), torch.cat([uncond, cond]), t)
        eps_u, eps_c = out[:1], out[1:]
        if mistake == "no_guidance":
            return eps_c
        if mistake == "swapped":
            return eps_c + guidance_scale * (eps_u - eps_c)
        return eps_u + guidance_scale * (eps_c - eps_u)

    if mistake == "init_noise_sigma":
        noise = noise * (1 + levels.sigmas.max() ** 2) ** 0.5      # as diffusers' schedulers want it
    latents = SAMPLING_LOOPS[sampler](predict_noise, noise, levels, generator=generator)
    if mistake == "divide_by_scale":
        latents = latents / 0.18215       # as in code bases whose decoder does not unscale
    image = pipe.decoder(latents.float())
    if mistake == "no_rescale":
        return image
    return ((image + 1) / 2).clamp(0, 1)


def with_mistake(mistake):
    def fn(*args, **kwargs):
        return learner_text_to_image(*args, **kwargs, mistake=mistake)
    return fn


def test_check_passes_a_correct_loop_and_the_reference_with_one_line_each(capsys):
    assert check_text_to_image(learner_text_to_image)
    assert check_text_to_image(reference_text_to_image)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("✅ check_text_to_image passed: matches StableDiffusion.generate on 3 random inputs")


def test_tiny_pipeline_is_a_stable_diffusion_whose_prompt_matters():
    pipe = tiny_pipeline()
    assert isinstance(pipe, StableDiffusion) and pipe.native_size == 16
    common = dict(height=16, width=16, num_inference_steps=2, guidance_scale=7.5, seed=0)
    a = reference_text_to_image(pipe, "a red circle", **common)
    b = reference_text_to_image(pipe, "a photo of a cat", **common)
    assert a.shape == (1, 3, 16, 16)
    assert (a - b).abs().max() > 1e-2      # the prompt changes the picture far beyond the check's tolerance
    torch.testing.assert_close(a, reference_text_to_image(tiny_pipeline(), "a red circle", **common))   # seeded


@pytest.mark.parametrize("mistake, message", [
    ("no_guidance", "no guidance"),
    ("swapped", "cond and uncond are swapped"),
    ("zeros", "unconditional context is zeros"),
    ("always_empty_negative", "negative prompt is ignored"),
    ("init_noise_sigma", "scaled by diffusers' init_noise_sigma"),
    ("divide_by_scale", "divided by 0.18215"),
    ("no_rescale", "map it to [0, 1]"),
])
def test_check_text_to_image_names_the_mistake(mistake, message):
    with pytest.raises(AssertionError) as info:
        check_text_to_image(with_mistake(mistake))
    text = str(info.value)
    assert "check_text_to_image failed" in text and message in text, text


def test_check_text_to_image_reports_a_wrong_latent_size():
    """SD v1's VAE shrinks 8x; the tiny one 2x: a hard-coded 8 gives a picture of the wrong size."""
    with pytest.raises(AssertionError) as info:
        check_text_to_image(with_mistake("factor_8"))
    assert "shape (1, 3, 4, 4), expected (1, 3, 16, 16)" in str(info.value)
    assert "pipe.vae_factor" in str(info.value)


def test_pick_goes_on_with_the_reference_when_the_loop_is_wrong(capsys):
    assert pick(check_text_to_image, with_mistake("swapped"), reference=reference_text_to_image) \
        is reference_text_to_image
    out = capsys.readouterr().out
    assert "❌ check_text_to_image failed" in out
    assert "using the reference sd.course.checks.pipeline.reference_text_to_image" in out
