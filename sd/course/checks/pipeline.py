"""Checks for notebook 09 (text to image): the whole loop from a prompt to a picture (9.1), and the per-token
cross-attention maps of one of the UNet's cross-attention layers (9.2).

`check_text_to_image` builds a tiny Stable Diffusion with random weights (every module of SD v1, only narrow), runs
the learner's loop and `generate` on the same prompt and seed, and compares the images. The `Mistake`s rerun the
loop the typical wrong ways (no guidance, cond and uncond swapped, zeros for the empty prompt, the latents
scaled twice, ...), so a wrong picture is named, not just reported.

`check_cross_attention_maps` gives the learner's function random `CrossAttention` layers and inputs and compares
the maps with the reference (softmax over the tokens, averaged over the heads, laid out on the latent grid).
Every message is in words: the answer's code is only printed by `solution()`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from ...attention import split_heads
from ...clip import CLIP
from ...config import CLIPConfig, UNetConfig, VAEConfig
from ...cross_attention import CrossAttention
from ...decoder import VAE_Decoder
from ...encoder import VAE_Encoder
from ...pipeline import StableDiffusion
from ...samplers import SAMPLING_LOOPS
from ...tokenizer import CLIPTokenizer, learn_bpe_merges
from ...unet import DiffusionUNET
from .common import Case, Mistake, check_function, randn, seeded

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
    sampler) -> the image as a (1, 3, H, W) tensor in [0, 1], the same as the pipeline's generate (as a tensor)."""
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
        Mistake("no guidance: the image follows the conditional prediction alone; mix the two halves, "
                "ε̂ = ε_uncond + g (ε_cond − ε_uncond)", wrong("no_guidance")),
        Mistake("cond and uncond are swapped: the first half of the doubled batch is the unconditional one, and "
                "guidance moves from ε_uncond towards ε_cond, ε̂ = ε_uncond + g (ε_cond − ε_uncond)",
                wrong("swapped")),
        Mistake("the unconditional context is zeros: it is CLIP's encoding of the negative prompt (the empty "
                "prompt \"\" by default), 77 vectors like the prompt's", wrong("zeros_uncond")),
        Mistake("the negative prompt is ignored: the unconditional half encodes the negative prompt you are given, "
                "not always the empty prompt", wrong("ignores_negative")),
        Mistake("the initial noise is scaled by diffusers' init_noise_sigma: every sampler here starts from x_T, "
                "the noise as drawn (the Euler samplers rescale it to x_0 + σ ε inside their loop)",
                wrong("init_sigma")),
        Mistake("the latents are divided by the latent scale (0.18215 for SD) before the decoder, which divides "
                "by it itself: hand the sampler's latents to this package's decoder as they are",
                wrong("double_scale")),
        Mistake("the image is in the decoder's range [-1, 1]: map it to [0, 1] (halve it, add one half, "
                "clip to [0, 1])", wrong("no_rescale")),
    ]
    with _one_thread():
        return check_function("check_text_to_image", fn, reference_text_to_image, cases, mistakes,
                              reference_name="the pipeline's own generate", atol=IMAGE_ATOL, rtol=0.0,
                              exercise="9.1",
                              hint="the order of the random numbers matters: one CPU generator seeded with the "
                                   "seed draws the starting latents (1, 4, H/f, W/f), f the pipeline's VAE factor, "
                                   "before the sampler draws anything; the guided prediction runs the UNet once on "
                                   "the doubled batch, unconditional half first; the decoder undoes the latent "
                                   "scale itself and returns [-1, 1]")


# ----------------------------------------------------------------------------------------------------------
# Exercise 9.2: the per-token cross-attention maps of one cross-attention layer
# ----------------------------------------------------------------------------------------------------------

def reference_cross_attention_maps(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The reference for exercise 9.2: (B, S, side, side), each pixel's softmax weights over the S tokens,
    averaged over the heads, with token s's weights laid out on the side x side latent grid."""
    b, n, _ = x.shape
    side = math.isqrt(n)
    q = split_heads(attn.to_q(x), attn.n_heads)                       # (B, N, C) -> (B, H, N, C/H)
    k = split_heads(attn.to_k(context), attn.n_heads)                 # (B, S, D) -> (B, H, S, C/H)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)   # (B, H, N, S)
    return weights.mean(dim=1).transpose(1, 2).reshape(b, -1, side, side)          # (B, S, side, side)


def _maps_done_wrong(attn, x, context, *, wrong: str) -> torch.Tensor:
    """The maps with one thing done a typical wrong way."""
    b, n, c = x.shape
    side = math.isqrt(n)
    heads = 1 if wrong == "one_head" else attn.n_heads
    q = split_heads(attn.to_q(x), heads)
    k = split_heads((attn.to_v if wrong == "values" else attn.to_k)(context), heads)
    scale = {"no_scale": 1.0, "full_width": math.sqrt(c)}.get(wrong, math.sqrt(q.shape[-1]))
    weights = (q @ k.transpose(-2, -1) / scale).softmax(dim=-2 if wrong == "over_pixels" else -1)
    weights = weights.sum(dim=1) if wrong == "sum_heads" else weights.mean(dim=1)          # (B, N, S)
    if wrong == "no_transpose":
        return weights.reshape(b, -1, side, side)
    maps = weights.transpose(1, 2).reshape(b, -1, side, side)
    return maps.transpose(-2, -1) if wrong == "swapped_axes" else maps


def check_cross_attention_maps(fn) -> bool:
    """Exercise 9.2: fn(attn, x, context) -> (B, S, side, side): for each token, the weight every latent pixel gives
    it (softmax over the tokens, averaged over the heads), laid out on the side x side grid of the N pixels."""
    with seeded():
        cases = []
        for dim, context_dim, heads, side, tokens in ((16, 12, 2, 4, 7), (24, 8, 3, 3, 5), (32, 32, 4, 2, 9)):
            layer = CrossAttention(dim, context_dim, heads).eval()
            for p in layer.parameters():
                p.data.mul_(3.0)          # peakier weights than a fresh layer's, so that mistakes show
            cases.append(Case({"attn": layer, "x": randn(2, side * side, dim), "context": randn(2, tokens,
                                                                                                   context_dim)}))

    def wrong(how):
        return lambda ref, c: _maps_done_wrong(*c.inputs.values(), wrong=how)

    mistakes = [
        Mistake("the scores are not divided by the square root of the head width: softmax(QKᵀ/√d) with d = C/H",
                wrong("no_scale")),
        Mistake("the scores are divided by the square root of the layer's whole width C: each head's own width "
                "d = C/H sets the scale", wrong("full_width")),
        Mistake("the softmax runs over the pixels: each PIXEL's weights over the S tokens sum to 1 (the softmax "
                "over the last axis of the (B, H, N, S) scores)", wrong("over_pixels")),
        Mistake("the heads are not split: the layer attends with H heads, each comparing its own C/H-wide slice "
                "of the queries and keys; compute H maps and average them", wrong("one_head")),
        Mistake("the heads are summed: average them, so that each pixel's weights still sum to 1",
                wrong("sum_heads")),
        Mistake("the keys come from the value projection: the attention weights compare queries with KEYS, "
                "the text projected by the key projection", wrong("values")),
        Mistake("the (B, N, S) weights are reshaped straight to (B, S, side, side): bring the token axis before "
                "the pixel axis first (a transpose), then lay the N pixels out as side x side",
                wrong("no_transpose")),
        Mistake("each map is transposed (rows and columns swapped): the N pixels are the latent's rows one after "
                "another (row-major order): keep that order when you lay them out as side x side", wrong("swapped_axes")),
    ]
    return check_function("check_cross_attention_maps", fn, reference_cross_attention_maps, cases, mistakes,
                          reference_name="the reference maps (softmax over the tokens, mean over the heads)",
                          exercise="9.2",
                          hint="recompute the layer's attention weights from its own query and key projections, "
                               "split into its heads, softmax over the tokens; average over the heads, then give "
                               "each token one side x side map (the N pixels in row-major order)")
