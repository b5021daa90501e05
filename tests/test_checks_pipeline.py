"""The exercise checks of notebook 09 (text to image): a correct loop and correct maps pass, plausible wrong ones
are named, and a wrong answer the checks do not know gets a message in words that points to the hints.

The loops and maps below are written the way a learner would write them (from the pipeline's parts and the layer's
projections, not from the check), each with one typical mistake, switched on by a flag.
"""
from __future__ import annotations

import math

import pytest
import torch

from sd.course.checks import check_cross_attention_maps, check_text_to_image, pick
from sd.course.checks.pipeline import reference_cross_attention_maps, reference_text_to_image, tiny_pipeline
from sd.pipeline import StableDiffusion
from sd.samplers import SAMPLING_LOOPS
from sd.cross_attention import CrossAttention
from tests.check_helpers import program_text, rejects, rejects_unrecognised


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
    if mistake == "seed_plus_one":
        latents = SAMPLING_LOOPS[sampler](predict_noise, torch.randn(noise.shape, generator=generator), levels,
                                          generator=generator)
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
    assert lines[0].startswith("✅ check_text_to_image passed: matches the pipeline's own generate on 3 random inputs")


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
    ("divide_by_scale", "divided by the latent scale"),
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
    assert "the pipeline's VAE factor" in str(info.value)
    assert 'hint("9.1")' in str(info.value)


def test_check_text_to_image_points_an_unknown_mistake_to_the_hints_without_code():
    """Noise drawn a second time (not the first draw of the generator): no named mistake, a message in words."""
    message = rejects_unrecognised(check_text_to_image, with_mistake("seed_plus_one"), "9.1")
    assert "differs from the pipeline's own generate" in message


def test_pick_goes_on_with_the_reference_when_the_loop_is_wrong(capsys):
    assert pick(check_text_to_image, with_mistake("swapped"), reference=reference_text_to_image) \
        is reference_text_to_image
    out = capsys.readouterr().out
    assert "❌ check_text_to_image failed" in out
    assert "using the reference sd.course.checks.pipeline.reference_text_to_image" in out


# ---------------------------------------------------------------------------------------------------------
# 9.2 the per-token cross-attention maps, as a learner might write them
# ---------------------------------------------------------------------------------------------------------

def maps_learner(attn, x, context, mistake=None):
    """Written with einsum and explicit head reshapes (not the check's split_heads)."""
    b, n, c = x.shape
    h = 1 if mistake == "one_head" else attn.n_heads
    d = c // h
    q = attn.to_q(x).reshape(b, n, h, d)                                   # (B, N, H, d)
    k = (attn.to_v if mistake == "values" else attn.to_k)(context).reshape(b, -1, h, d)   # (B, S, H, d)
    scores = torch.einsum("bnhd,bshd->bhns", q, k)
    if mistake != "no_scale":
        scores = scores / math.sqrt(c if mistake == "full_width" else d)
    weights = scores.softmax(dim=2 if mistake == "over_pixels" else 3)    # (B, H, N, S)
    if mistake == "max_heads":
        weights = weights.max(dim=1).values
    elif mistake == "sum_heads":
        weights = weights.sum(dim=1)
    else:
        weights = weights.mean(dim=1)                                      # (B, N, S)
    side = math.isqrt(n)
    if mistake == "no_transpose":
        return weights.reshape(b, -1, side, side)
    maps = weights.permute(0, 2, 1).reshape(b, -1, side, side)
    return maps.transpose(2, 3) if mistake == "swapped_axes" else maps


def maps_with(mistake):
    return lambda attn, x, context: maps_learner(attn, x, context, mistake)


def test_check_cross_attention_maps_passes_the_reference_and_a_right_variant(capsys):
    assert check_cross_attention_maps(reference_cross_attention_maps)
    assert check_cross_attention_maps(maps_learner)
    assert capsys.readouterr().out.count("✅ check_cross_attention_maps passed") == 2


def test_reference_maps_are_each_pixels_weights_over_the_tokens():
    """Every pixel's weights over the tokens sum to 1; the maps average the heads: a pixel that matches token 0 in
    head 0 only (weight ~1 there) and nothing in head 1 (1/3 for each of the 3 tokens) gives token 0 (1 + 1/3) / 2."""
    torch.manual_seed(0)
    attn = CrossAttention(8, 8, 2)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(8) * 4)
        attn.to_k.weight.copy_(torch.eye(8) * 4)
    context = torch.zeros(1, 3, 8)
    context[0, 0, 0] = 1.0                                   # token 0 points along feature 0; tokens 1, 2 are zero
    x = torch.zeros(1, 4, 8)
    x[0, 1, 0] = 3.0                                         # only pixel 1 (row 0, column 1) looks along feature 0
    with torch.no_grad():
        maps = reference_cross_attention_maps(attn, x, context)  # (1, 3, 2, 2)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(1, 2, 2))
    assert abs(float(maps[0, 0, 0, 1]) - 2 / 3) < 1e-3            # pixel 1 is row 0, column 1
    assert abs(float(maps[0, 0, 1, 0]) - 1 / 3) < 1e-6            # pixel 2 matches nothing: uniform


@pytest.mark.parametrize("mistake, fragment", [
    ("no_scale", "not divided by the square root of the head width"),
    ("full_width", "the layer's whole width"),
    ("over_pixels", "the softmax runs over the pixels"),
    ("one_head", "the heads are not split"),
    ("sum_heads", "the heads are summed"),
    ("values", "the keys come from the value projection"),
    ("no_transpose", "reshaped straight to"),
    ("swapped_axes", "each map is transposed"),
])
def test_check_cross_attention_maps_names_the_mistake(mistake, fragment):
    message = rejects(check_cross_attention_maps, maps_with(mistake), fragment)
    assert program_text_free(message)


def program_text_free(message: str) -> bool:
    found = program_text(message)
    assert found is None, f"the message shows program text ({found}):\n{message}"
    return True


def test_check_cross_attention_maps_points_an_unknown_mistake_to_the_hints_without_code():
    """The maximum over the heads instead of their mean: not a mistake the check knows."""
    rejects_unrecognised(check_cross_attention_maps, maps_with("max_heads"), "9.2")


def test_check_text_to_image_names_its_mistakes_in_words():
    for mistake in ("no_guidance", "swapped", "zeros", "init_noise_sigma", "divide_by_scale", "no_rescale"):
        with pytest.raises(AssertionError) as info:
            check_text_to_image(with_mistake(mistake))
        assert program_text_free(str(info.value))
