"""Check for notebook 09 (text to image): the whole loop from a prompt to a picture, against `StableDiffusion.generate`.

The check builds a tiny Stable Diffusion with random weights (every module of SD v1, only narrow), runs the
learner's loop and `generate` on the same prompt and seed, and compares the images. The `Mistake`s rerun the
loop the typical wrong ways (no guidance, cond and uncond swapped, zeros for the empty prompt, the latents
scaled twice, ...), so a wrong picture is named, not just reported.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ...clip import CLIP
from ...config import CLIPConfig, UNetConfig, VAEConfig
from ...decoder import VAE_Decoder
from ...encoder import VAE_Encoder
from ...pipeline import StableDiffusion
from ...samplers import SAMPLING_LOOPS
from ...tokenizer import CLIPTokenizer, learn_bpe_merges
from ...unet import DiffusionUNET
from .common import Case, Mistake, check_function, seeded

# generate() decodes in float32; the same loop written out differs only by float32 rounding (~1e-6).
IMAGE_ATOL = 1e-4
# The tiny model's words, and its sizes: SD v1's structure (2 levels here), narrow enough to run in a second.
_CAPTIONS = ["a red circle on a blue background", "a green square", "a yellow triangle in the top left",
             "a photo of a cat", "an astronaut riding a horse"]
_NUM_MERGES = 60
_IMAGE_SIZE = 16
# Random cross-attention weights barely move the image; scaled up, the prompt matters as it does in a trained model.
_TEXT_GAIN = 8.0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the tiny model on one CPU thread: at these sizes more threads only add overhead (and stall on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TinyStableDiffusion(StableDiffusion):
    """A StableDiffusion with random weights at toy sizes (what the check runs your loop on)."""

    def __repr__(self) -> str:
        return "tiny_random_sd"


def tiny_pipeline(seed: int = 0) -> TinyStableDiffusion:
    """A random-weight SD v1 in miniature: 16 x 16 images, 8 x 8 latents, a 1-layer CLIP; seeded, so always the same."""
    tokenizer = CLIPTokenizer.from_merges(learn_bpe_merges(_CAPTIONS, _NUM_MERGES))
    vae = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)
    with seeded(seed):
        clip = CLIP(CLIPConfig(vocab_size=len(tokenizer), width=32, layers=1, heads=2, mlp_width=64))
        unet = DiffusionUNET(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                        heads=2, context_dim=32, norm_groups=8,
                                        sample_size=_IMAGE_SIZE // vae.downsample_factor))
        encoder, decoder = VAE_Encoder(vae), VAE_Decoder(vae)
        for name, p in unet.named_parameters():
            if "attn2.to_out" in name:
                p.data.mul_(_TEXT_GAIN)
    for model in (clip, unet, encoder, decoder):
        model.eval().requires_grad_(False)
    return TinyStableDiffusion(clip=clip, encoder=encoder, decoder=decoder, unet=unet, tokenizer=tokenizer)


@torch.no_grad()
def reference_text_to_image(pipe: StableDiffusion, prompt: str, negative_prompt: str = "", *, height: int,
                            width: int, num_inference_steps: int, guidance_scale: float, seed: int,
                            sampler: str = "ddim") -> torch.Tensor:
    """The reference for exercise 9.1: `pipe.generate` with the same arguments, as a (1, 3, H, W) tensor in [0, 1]."""
    return pipe.generate(prompt, negative_prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, sampler=sampler, seed=seed, output_type="pt", progress=False)


@torch.no_grad()
def _loop_done_wrong(pipe, prompt, negative_prompt="", *, height, width, num_inference_steps, guidance_scale, seed,
                     sampler="ddim", wrong: str = ""):
    """The text-to-image loop with one thing (`wrong`) done a typical wrong way; wrong="" is the right loop."""
    generator = torch.Generator("cpu").manual_seed(seed)
    context = pipe.clip(pipe.tokenizer([prompt]))                                     # (1, 77, D)
    uncond = pipe.clip(pipe.tokenizer(["" if wrong == "ignores_negative" else negative_prompt]))
    if wrong == "zeros_uncond":
        uncond = torch.zeros_like(context)
    f = pipe.vae_factor
    latents = torch.randn((1, pipe.unet.config.in_channels, height // f, width // f), generator=generator)
    levels = pipe.scheduler.noise_levels(num_inference_steps, sampler)

    def predict_noise(x_t, t):
        eps_u, eps_c = pipe.unet(torch.cat([x_t, x_t]), torch.cat([uncond, context]), t).chunk(2)
        g = guidance_scale
        return {"no_guidance": eps_c, "swapped": eps_c + g * (eps_u - eps_c)}.get(wrong, eps_u + g * (eps_c - eps_u))

    if wrong == "init_sigma":
        latents = latents * (levels.sigmas[0] ** 2 + 1) ** 0.5
    x = SAMPLING_LOOPS[sampler](predict_noise, latents, levels, generator=generator)
    image = pipe.decoder(x / pipe.decoder.config.scaling_factor if wrong == "double_scale" else x)
    if wrong == "no_rescale":
        return image
    return (image / 2 + 0.5).clamp(0, 1)


def check_text_to_image(fn) -> bool:
    """Exercise 9.1: fn(pipe, prompt, negative_prompt, *, height, width, num_inference_steps, guidance_scale, seed,
    sampler) -> the image as a (1, 3, H, W) tensor in [0, 1], the same as pipe.generate(..., output_type="pt")."""
    pipe = tiny_pipeline()
    size = dict(height=_IMAGE_SIZE, width=_IMAGE_SIZE)
    cases = [
        Case({"pipe": pipe, "prompt": "a red circle on a blue background"},
             {"negative_prompt": "", **size, "num_inference_steps": 4, "guidance_scale": 7.5, "seed": 0,
              "sampler": "ddim"}),
        Case({"pipe": pipe, "prompt": "a photo of a cat"},
             {"negative_prompt": "a green square", **size, "num_inference_steps": 3, "guidance_scale": 3.0,
              "seed": 1, "sampler": "euler"}),
        Case({"pipe": pipe, "prompt": "an astronaut riding a horse"},
             {"negative_prompt": "", **size, "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 2,
              "sampler": "euler_a"}),
    ]

    def wrong(how):
        return lambda ref, c: _loop_done_wrong(*c.inputs.values(), **c.kwargs, wrong=how)

    mistakes = [
        Mistake("no guidance: the image follows eps_cond alone; mix eps = eps_uncond + guidance_scale * "
                "(eps_cond - eps_uncond)", wrong("no_guidance")),
        Mistake("cond and uncond are swapped: the batch is [uncond, cond] and eps = eps_uncond + g * "
                "(eps_cond - eps_uncond)", wrong("swapped")),
        Mistake("the unconditional context is zeros: it is CLIP's embedding of the negative prompt (the empty "
                "prompt \"\" by default), pipe.clip(pipe.tokenizer([negative_prompt]))", wrong("zeros_uncond")),
        Mistake("the negative prompt is ignored: the unconditional half encodes negative_prompt, not always \"\"",
                wrong("ignores_negative")),
        Mistake("the initial noise is scaled by diffusers' init_noise_sigma: every sampler here starts from x_T = "
                "the noise itself (the Euler samplers scale it to x_0 + sigma * noise inside)", wrong("init_sigma")),
        Mistake("the latents are divided by 0.18215 before the decoder, which divides by it itself: pass them "
                "as they are", wrong("double_scale")),
        Mistake("the image is in [-1, 1], the decoder's range: map it to [0, 1] with (image / 2 + 0.5).clamp(0, 1)",
                wrong("no_rescale")),
    ]
    with _one_thread():
        return check_function("check_text_to_image", fn, reference_text_to_image, cases, mistakes,
                              reference_name="StableDiffusion.generate", atol=IMAGE_ATOL, rtol=0.0,
                              hint="generator = torch.Generator('cpu').manual_seed(seed) draws the latents "
                                   "(1, 4, H/f, W/f), f = pipe.vae_factor, first, then goes to the sampler; "
                                   "levels = pipe.scheduler.noise_levels(steps, sampler); predict_noise(x_t, t): "
                                   "one UNet pass on [uncond, cond], guidance; "
                                   "x = SAMPLING_LOOPS[sampler](predict_noise, latents, levels, generator=generator); "
                                   "decode with pipe.decoder and map "
                                   "[-1, 1] to [0, 1]")
