"""`generate` gives diffusers' StableDiffusionPipeline / Img2ImgPipeline images on the same weights and noise."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sd
from sd.pipeline import StableDiffusion
from tests.reference import reference_and_ours, rel_err
from tests.test_tokenizer import _clip_merges_gz, _write_standard_clip_tokenizer_folder

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
                      timestep_spacing="leading")
TOL = 1e-4


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline)
    torch.manual_seed(0)
    ref, ours = reference_and_ours(seed=5)
    folder = _write_standard_clip_tokenizer_folder(_clip_merges_gz(), tmp_path_factory.mktemp("t") / "tokenizer")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    parts = dict(vae=ref["vae"], text_encoder=ref["clip"], tokenizer=hf_tok, unet=ref["unet"],
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    txt = StableDiffusionPipeline(scheduler=DDIMScheduler(**SD15_SCHEDULER), **parts)
    dpm = StableDiffusionPipeline(scheduler=DPMSolverMultistepScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                                                             if k not in ("set_alpha_to_one", "clip_sample")}), **parts)
    img = StableDiffusionImg2ImgPipeline(scheduler=DDIMScheduler(**SD15_SCHEDULER), **parts)
    for p in (txt, dpm, img):
        p.set_progress_bar_config(disable=True)
    mine = StableDiffusion(**ours, tokenizer=sd.CLIPTokenizer(folder))
    return mine, txt, dpm, img


def test_text_to_image_matches_diffusers_pipeline(pipes):
    mine, txt, _, _ = pipes
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle on a blue background", "an astronaut riding a horse, 4k!"]
    with torch.no_grad():
        expected = txt(prompts, negative_prompt=["", "blurry"], height=64, width=64, num_inference_steps=8,
                       guidance_scale=7.5, latents=latents, output_type="pt").images
    got = mine.generate(prompts, ["", "blurry"], height=64, width=64, num_inference_steps=8, guidance_scale=7.5,
                        latents=latents, output_type="pt", progress=False)
    assert got.shape == (2, 3, 64, 64)
    assert (got - expected).abs().max() < TOL


def test_text_to_image_with_dpmpp2m_matches_diffusers(pipes):
    mine, _, dpm, _ = pipes
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dpm("a cat", height=64, width=128, num_inference_steps=6, latents=latents, output_type="pt").images
    got = mine.generate("a cat", height=64, width=128, num_inference_steps=6, sampler="dpmpp2m",
                        latents=latents, output_type="pt", progress=False)
    assert (got - expected).abs().max() < TOL


def test_image_to_image_matches_diffusers_pipeline(pipes):
    mine, _, _, img = pipes
    from skimage import data
    picture = Image.fromarray(data.astronaut()).resize((64, 64))
    with torch.no_grad():
        expected = img("a watercolor portrait", image=picture, strength=0.6, num_inference_steps=10,
                       guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="pt").images
    got = mine.generate("a watercolor portrait", init_image=picture, strength=0.6, num_inference_steps=10,
                        guidance_scale=5.0, seed=7, output_type="pt", progress=False)
    assert (got - expected).abs().max() < TOL
    # the same picture as an array gives the same result
    again = mine.generate("a watercolor portrait", init_image=np.asarray(picture), strength=0.6,
                          num_inference_steps=10, guidance_scale=5.0, seed=7, output_type="pt", progress=False)
    assert torch.equal(got, again)


def test_same_seed_same_images_and_batches(pipes):
    mine = pipes[0]
    kw = dict(height=64, width=64, num_inference_steps=3, progress=False)
    a = mine.generate("a dog", seed=3, num_images=2, **kw)
    b = mine.generate("a dog", seed=3, num_images=2, **kw)
    c = mine.generate("a dog", seed=4, num_images=2, **kw)
    assert len(a) == 2 and all(isinstance(i, Image.Image) and i.size == (64, 64) for i in a)
    assert [np.asarray(i).tolist() for i in a] == [np.asarray(i).tolist() for i in b]
    assert np.asarray(a[0]).tolist() != np.asarray(c[0]).tolist()
    assert np.asarray(a[0]).tolist() != np.asarray(a[1]).tolist()


def test_guidance_scale_one_skips_the_unconditional_pass(pipes):
    mine = pipes[0]
    batches = []
    original = mine.unet.forward
    mine.unet.forward = lambda x, c, t: (batches.append(x.shape[0]), original(x, c, t))[1]
    try:
        mine.generate("", guidance_scale=1.0, height=64, width=64, num_inference_steps=2, seed=0, progress=False)
        mine.generate("x", guidance_scale=2.0, height=64, width=64, num_inference_steps=2, seed=0, progress=False)
    finally:
        del mine.unet.forward
    assert batches == [1, 1, 2, 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=500), r"height must be a positive multiple of 64.*got 500; the nearest sizes that work are 448 or 512"),
    (dict(width=72), r"width must be a positive multiple of 64.*64 or 128"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_inference_steps=1001), r"num_inference_steps must be an integer from 1 to 1000"),
    (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(sampler="plms"), r"ddpm.*ddim.*euler.*euler_a.*dpmpp2m"),
])
def test_bad_arguments_get_one_clear_line(pipes, kwargs, message):
    mine = pipes[0]
    base = dict(height=64, width=64, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        mine.generate("a cat", **{**base, **kwargs})


def test_over_long_prompt_is_truncated_with_a_warning(pipes):
    mine = pipes[0]
    with pytest.warns(UserWarning, match=r"longer than 77 tokens.*dropped the end"):
        mine.generate("a cat " * 60, height=64, width=64, num_inference_steps=1, progress=False)


def test_init_image_of_unfit_size_is_rejected_or_resized(pipes):
    mine = pipes[0]
    odd = Image.new("RGB", (70, 64))
    with pytest.raises(ValueError, match=r"init_image width must be a positive multiple of 64.*got 70"):
        mine.generate("a cat", init_image=odd, num_inference_steps=2, progress=False)
    out = mine.generate("a cat", init_image=odd, width=64, height=64, num_inference_steps=2, progress=False)
    assert out[0].size == (64, 64)
