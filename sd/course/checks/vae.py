"""Checks for notebook 02 (the VAE): residual block, attention block, reparameterization, encoder, decoder, latent scale.

Each check compares with `sd.vae_blocks`, `sd.encoder` and `sd.decoder`; the `Mistake`s below recompute the
reference the typical wrong ways (GroupNorm eps 1e-5, no skip connection, logvar used as the standard deviation,
symmetric padding, no 0.18215, ...), so a wrong answer is named, not just reported. Every message is words or maths.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LATENT_SCALE, VAEConfig
from ...decoder import VAE_Decoder
from ...encoder import LOGVAR_MAX, LOGVAR_MIN, VAE_Encoder
from ...vae_blocks import VAE_NORM_EPS, VAE_AttentionBlock, VAE_ResidualBlock
from .common import (Case, Mistake, _hint_line, _unknown_mistake, check_function, check_module, randn,
                     require_callable, seeded)

# PyTorch's default GroupNorm epsilon: what nn.GroupNorm(groups, channels) uses when eps is not given.
TORCH_NORM_EPS = 1e-5
# Standard deviation of the low-contrast inputs: per-group variance ~1e-5, the size of the epsilon itself, so
# eps 1e-5 instead of 1e-6 changes the normalised values by ~30% (at SD's scale it shows as 3.8e-4 on the output).
LOW_CONTRAST = 3e-3
# The right and the symmetric padding before the VAE's stride-2 convolution: (left, right, top, bottom).
PAD_RIGHT_BOTTOM = (0, 1, 0, 1)
# At even sizes the stride-2 windows never reach the last row and column, so symmetric padding (or padding=1 in the
# conv) gives the same numbers as padding the left and top only.
PAD_SYMMETRIC = (1, 1, 1, 1)


def _low_contrast(*shape: int) -> torch.Tensor:
    """A nearly flat input (a patch of sky): one level per image plus tiny variations (draw inside `seeded()`)."""
    return randn(shape[0], *([1] * (len(shape) - 1))) + LOW_CONTRAST * randn(*shape)


def _with_pointed_hints(run: Callable[[], bool], rules: list[tuple[tuple[str, ...], str]]) -> bool:
    """Run a check; if its message contains every fragment of a rule, replace the general hint by that rule's."""
    try:
        return run()
    except AssertionError as e:
        message = str(e)
        for fragments, hint in rules:
            if all(fragment in message for fragment in fragments):
                raise AssertionError(message.split("\n  Hint: ")[0] + f"\n  Hint: {hint}") from e.__cause__
        raise


# ----------------------------------------------------------------------------------------------------------
# Exercise 2.1: the residual block
# ----------------------------------------------------------------------------------------------------------

def _residual(ref, x, eps: float = VAE_NORM_EPS, act: str = "silu", order: str = "norm_act_conv",
              skip: str = "x") -> torch.Tensor:
    """The reference residual block's forward, with one thing done the wrong way (its weights)."""
    activation = {"silu": F.silu, "relu": F.relu, "none": lambda t: t}[act]

    def unit(h, norm, conv):
        if order == "conv_norm_act":
            return activation(F.group_norm(conv(h), norm.num_groups, norm.weight, norm.bias, eps))
        return conv(activation(F.group_norm(h, norm.num_groups, norm.weight, norm.bias, eps)))

    h = unit(unit(x, ref.norm1, ref.conv1), ref.norm2, ref.conv2)
    if skip == "none":
        return h
    source = {"x": x, "normed": F.group_norm(x, ref.norm1.num_groups, ref.norm1.weight, ref.norm1.bias, eps)}[skip]
    return (source if ref.conv_shortcut is None else ref.conv_shortcut(source)) + h


_SHORTCUT_HINTS = [
    (("missing in yours: conv_shortcut",),
     "conv_shortcut is missing: when the input and output widths differ, the skip must change width too, "
     "through a 1×1 convolution from the input width to the output width, before it is added"),
    (("unexpected in yours: conv_shortcut",),
     "conv_shortcut exists although the widths are equal: create it only when the widths differ "
     "(SD's checkpoint has no shortcut weights there: the skip is the input itself); store None otherwise"),
    (("raised RuntimeError", "must match the size"),
     "the input and the convolutions' output have different widths when the block changes width: pass the "
     "input through conv_shortcut (the 1×1 convolution) before adding it"),
]


def check_vae_residual_block(cls) -> bool:
    """Exercise 2.1: cls(in_channels, out_channels, groups); forward(x (B, C_in, H, W)) -> (B, C_out, H, W)."""
    with seeded(10):
        cases = [Case({"x": randn(2, 8, 6, 6)}, init={"in_channels": 8, "out_channels": 8, "groups": 4}),
                 Case({"x": _low_contrast(2, 8, 5, 7)}, init={"in_channels": 8, "out_channels": 8, "groups": 4}),
                 Case({"x": randn(1, 8, 4, 4)}, init={"in_channels": 8, "out_channels": 16, "groups": 4}),
                 Case({"x": _low_contrast(1, 16, 6, 4)}, init={"in_channels": 16, "out_channels": 8, "groups": 4})]

    def wrong(**how):
        return lambda ref, c: _residual(ref, c.inputs["x"], **how)

    mistakes = [
        Mistake("the GroupNorm epsilon is PyTorch's default 1e-5: SD's VAE uses ε = 1e-6 in every GroupNorm "
                "(VAE_NORM_EPS); it matters on flat, low-contrast regions",
                wrong(eps=TORCH_NORM_EPS)),
        Mistake("the skip connection is missing: add the block's input (through conv_shortcut when the width "
                "changes) to the convolutions' output",
                wrong(skip="none")),
        Mistake("the skip starts from the normalised input: add the block's input itself, "
                "not its GroupNorm", wrong(skip="normed")),
        Mistake("the activation is ReLU: SD uses SiLU, x·sigmoid(x)", wrong(act="relu")),
        Mistake("the activation is missing: each unit is GroupNorm, then SiLU, then the convolution",
                wrong(act="none")),
        Mistake("the order is conv, norm, SiLU: SD's blocks are pre-activation, norm, then SiLU, then conv, twice",
                wrong(order="conv_norm_act")),
    ]
    return _with_pointed_hints(
        lambda: check_module("check_vae_residual_block", cls, VAE_ResidualBlock, cases, mistakes, exercise="2.1",
                             hint="norm, SiLU, 3×3 conv, twice, plus the input (through the 1×1 shortcut when the "
                                  "width changes); GroupNorm ε = 1e-6"),
        _SHORTCUT_HINTS)


# ----------------------------------------------------------------------------------------------------------
# Exercise 2.2: the attention block
# ----------------------------------------------------------------------------------------------------------

def _vae_attention(ref, x, eps: float = VAE_NORM_EPS, norm: bool = True, residual: str = "x",
                   scale: str = "sqrt_c", tokens: str = "right", softmax_dim: int = -1,
                   out_proj: bool = True) -> torch.Tensor:
    """The reference attention block's forward, with one thing done the wrong way (its weights)."""
    b, c, h, w = x.shape
    gn = ref.group_norm
    normed = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, eps) if norm else x
    if tokens == "no_transpose":    # a view straight to (B, H*W, C) mixes channels and pixels
        seq = normed.reshape(b, h * w, c)
    else:                           # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C)
        seq = normed.reshape(b, c, h * w).transpose(1, 2)
    q, k, v = ref.to_q(seq), ref.to_k(seq), ref.to_v(seq)
    factor = {"sqrt_c": 1 / math.sqrt(c), "none": 1.0, "c": 1 / c}[scale]
    out = ((q @ k.transpose(-2, -1)) * factor).softmax(dim=softmax_dim) @ v     # (B, H*W, C)
    if out_proj:
        out = ref.to_out(out)
    if tokens in ("no_transpose", "back_no_transpose"):
        out = out.reshape(b, c, h, w)
    else:                           # (B, H*W, C) -> (B, C, H*W) -> (B, C, H, W)
        out = out.transpose(1, 2).reshape(b, c, h, w)
    return {"x": x + out, "none": out, "normed": normed + out}[residual]


def check_vae_attention_block(cls) -> bool:
    """Exercise 2.2: cls(channels, groups); forward(x (B, C, H, W)) -> x + attention over the H*W pixels."""
    with seeded(11):
        cases = [Case({"x": randn(2, 8, 4, 4)}, init={"channels": 8, "groups": 4}),
                 Case({"x": randn(1, 16, 3, 5)}, init={"channels": 16, "groups": 4}),
                 Case({"x": _low_contrast(2, 8, 4, 6)}, init={"channels": 8, "groups": 2})]

    def wrong(**how):
        return lambda ref, c: _vae_attention(ref, c.inputs["x"], **how)

    mistakes = [
        Mistake("the residual connection is missing: the block returns its input plus the attention's output",
                wrong(residual="none")),
        Mistake("the residual adds the normalised input: add the block's input itself, not its GroupNorm",
                wrong(residual="normed")),
        Mistake("the GroupNorm is skipped: normalise the input with group_norm before the projections",
                wrong(norm=False)),
        Mistake("the GroupNorm epsilon is 1e-5: SD's VAE uses ε = 1e-6", wrong(eps=TORCH_NORM_EPS)),
        Mistake("the scores are not scaled: multiply Q Kᵀ by 1/√C (one head of C channels)",
                wrong(scale="none")),
        Mistake("the scores are divided by C: the scale is 1/√C", wrong(scale="c")),
        Mistake("the pixels are made tokens the wrong way: flatten (B, C, H, W) to (B, C, H·W), then swap the "
                "last two axes to (B, H·W, C); reading the memory directly as (B, H·W, C) mixes channels and pixels",
                wrong(tokens="no_transpose")),
        Mistake("the output is turned back into an image the wrong way: swap (B, H·W, C) to (B, C, H·W) "
                "before unflattening to (B, C, H, W)", wrong(tokens="back_no_transpose")),
        Mistake("the softmax runs over the queries (the second-to-last dimension): each pixel's weights over the "
                "others must sum to 1, over the last dimension", wrong(softmax_dim=-2)),
        Mistake("the output projection is missing: the attention's output goes through to_out",
                wrong(out_proj=False)),
    ]
    return check_module("check_vae_attention_block", cls, VAE_AttentionBlock, cases, mistakes, exercise="2.2",
                        hint="GroupNorm; pixels as tokens (B, H·W, C); one-head attention softmax(Q Kᵀ/√C) V; the "
                             "output projection; back to (B, C, H, W); plus the block's input")


# ----------------------------------------------------------------------------------------------------------
# Exercise 2.3: the reparameterization
# ----------------------------------------------------------------------------------------------------------

def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None,
                   scale: float = LATENT_SCALE) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * noise with logvar clamped to [-30, 20], times `scale` (noise None: the mean)."""
    if noise is None:
        return mean * scale
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    # Kingma & Welling 2014, sec. 2.4: z = mu + sigma * eps with sigma = exp(log sigma^2 / 2)
    return (mean + torch.exp(0.5 * logvar) * noise) * scale


def _reparam(mean, logvar, noise, scale, std: str = "exp_half", clamp: bool = True, scaled: str = "all"):
    """The sampling done one wrong way: std from logvar itself or from exp(logvar), no clamp, the scale misplaced."""
    if noise is None:
        return mean * (scale if scaled != "none" else 1.0)
    if clamp:
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    sigma = {"exp_half": torch.exp(0.5 * logvar), "logvar": logvar, "exp": torch.exp(logvar)}[std]
    if scaled == "mean":
        return mean * scale + sigma * noise
    if scaled == "divide":
        return (mean + sigma * noise) / scale
    return (mean + sigma * noise) * (scale if scaled == "all" else 1.0)


def check_reparameterize(fn) -> bool:
    """Exercise 2.3: fn(mean, logvar, noise, scale=0.18215) -> a scaled latent of mean's shape (noise None: the mean)."""
    with seeded(12):
        wide = randn(1, 4, 3, 3) * 4           # log-variances from about -12 to 12
        wide[0, 0, 0, :2] = torch.tensor([25.0, -40.0])   # outside [-30, 20]: the clamp must act
        cases = [Case({"mean": randn(2, 4, 3, 3), "logvar": randn(2, 4, 3, 3) - 2, "noise": randn(2, 4, 3, 3)}),
                 Case({"mean": randn(1, 4, 3, 3), "logvar": wide, "noise": randn(1, 4, 3, 3)}),
                 Case({"mean": randn(1, 4, 2, 5), "logvar": randn(1, 4, 2, 5), "noise": None}),
                 Case({"mean": randn(2, 4, 2, 2), "logvar": randn(2, 4, 2, 2), "noise": randn(2, 4, 2, 2)},
                      kwargs={"scale": 0.5})]

    def wrong(**how):
        return lambda ref, c: _reparam(*c.inputs.values(), c.kwargs.get("scale", LATENT_SCALE), **how)

    mistakes = [
        Mistake("the latent is not scaled: multiply by the scale (0.18215 for SD) so the latents have about unit "
                "variance, as the diffusion model expects", wrong(scaled="none")),
        Mistake("only the mean is scaled: scale the whole sample, (μ + σ·ε)·scale",
                wrong(scaled="mean")),
        Mistake("the latent is divided by the scale: in this package the encoder multiplies by it (the decoder "
                "divides)", wrong(scaled="divide")),
        Mistake("the log-variance is used as the standard deviation: σ = exp(½·log σ²)",
                wrong(std="logvar")),
        Mistake("exp(log σ²) is the variance, not the standard deviation: σ = exp(½·log σ²)",
                wrong(std="exp")),
        Mistake("the log-variance is not clamped to [−30, 20] first, as SD does (huge values would blow the "
                "sample up)", wrong(clamp=False)),
    ]

    def ignores_scale(ref, c):   # 0.18215 written in, the `scale` argument ignored
        return _reparam(*c.inputs.values(), LATENT_SCALE) if "scale" in c.kwargs else None

    mistakes.append(Mistake("the scale argument is ignored (0.18215 written in): multiply by the scale you are "
                            "given; the course's small model has its own factor", ignores_scale))
    return check_function("check_reparameterize", fn, reparameterize, cases, mistakes, exercise="2.3",
                          reference_name="the sampling of sd.encoder.VAE_Encoder.forward",
                          hint="without noise, the scaled mean; with noise, the scaled sample μ + σ·ε, σ computed "
                               "from the clamped log-variance")


# ----------------------------------------------------------------------------------------------------------
# Exercises 2.4 and 2.5: the encoder and the decoder, assembled from the blocks
# ----------------------------------------------------------------------------------------------------------

# Small configurations with SD's structure: a width change between levels, 2 or 3 downsamplings.
ENCODER_CONFIGS = (VAEConfig(block_channels=(8, 16, 16), layers_per_block=2, norm_groups=4),
                   VAEConfig(block_channels=(8, 8, 16, 16), layers_per_block=1, norm_groups=4, scaling_factor=0.5))


def _encode(ref, image, noise, pad=PAD_RIGHT_BOTTOM, attn: bool = True, silu_out: bool = True, quant: bool = True,
            swap: bool = False, scale: float | None = None, use_noise: bool = True) -> torch.Tensor:
    """The reference encoder's forward, with one thing done the wrong way (its weights)."""
    x = ref.conv_in(image)
    for level in ref.down:
        for block in level.res:
            x = block(x)
        if level.downsample is not None:
            x = F.conv2d(F.pad(x, pad), level.downsample.conv.weight, level.downsample.conv.bias, stride=2)
    x = ref.mid.res1(x)
    x = ref.mid.attn(x) if attn else x
    x = ref.mid.res2(x)
    x = ref.norm_out(x)
    x = ref.conv_out(F.silu(x) if silu_out else x)
    if quant:
        x = ref.quant_conv(x)
    mean, logvar = x.chunk(2, dim=1)
    if swap:
        mean, logvar = logvar, mean
    return reparameterize(mean, logvar, noise if use_noise else None,
                          ref.config.scaling_factor if scale is None else scale)


def check_vae_encoder(cls) -> bool:
    """Exercise 2.4: cls(config); forward(image (B, 3, H, W), noise=None) -> scaled latent (B, 4, H/f, W/f)."""
    with seeded(14):
        cases = [Case({"image": randn(2, 3, 16, 16)}, init={"config": ENCODER_CONFIGS[0]}),
                 Case({"image": randn(1, 3, 16, 24), "noise": randn(1, 4, 2, 3)}, init={"config": ENCODER_CONFIGS[1]})]

    def wrong(**how):
        return lambda ref, c: _encode(ref, c.inputs["image"], c.inputs.get("noise"), **how)

    mistakes = [
        Mistake("the downsampling pads the left and the top (symmetric padding, or a padding of 1 inside the "
                "convolution): SD pads one column on the right and one row at the bottom only, then the stride-2 "
                "convolution; use the given downsample modules", wrong(pad=PAD_SYMMETRIC)),
        Mistake("the latent is not scaled: the encoder's sample is multiplied by the config's scaling factor "
                "(exercise 2.3 does it)", wrong(scale=1.0)),
        Mistake("the scale is 0.18215 whatever the config: use the config's scaling factor (the course's small "
                "model has its own)", wrong(scale=LATENT_SCALE)),
        Mistake("the mid block's attention is skipped: the mid block is res1, then attn, then res2",
                wrong(attn=False)),
        Mistake("the SiLU before conv_out is missing: norm_out, SiLU, conv_out", wrong(silu_out=False)),
        Mistake("quant_conv is skipped: its 1×1 convolution turns conv_out's 8 channels into mean and log-variance",
                wrong(quant=False)),
        Mistake("mean and log-variance are swapped: the first 4 channels are the mean, the last 4 the "
                "log-variance", wrong(swap=True)),
        Mistake("the noise is ignored: with noise, sample μ + σ·ε", wrong(use_noise=False)),
    ]
    return check_module("check_vae_encoder", cls, VAE_Encoder, cases, mistakes, exercise="2.4",
                        hint="conv_in; each level's residual blocks, then its downsample (if it has one); the mid "
                             "block; norm_out, SiLU, conv_out; quant_conv; the 8 channels split into mean and "
                             "log-variance; the sample scaled by the config's factor")


def _decode(ref, latent, unscale: str = "divide", post_quant: bool = True, attn: bool = True,
            silu_out: bool = True, clamp: bool = False, scale: float | None = None) -> torch.Tensor:
    """The reference decoder's forward, with one thing done the wrong way (its weights)."""
    s = ref.config.scaling_factor if scale is None else scale
    x = {"divide": latent / s, "multiply": latent * s, "none": latent}[unscale]
    if post_quant:
        x = ref.post_quant_conv(x)
    x = ref.conv_in(x)
    x = ref.mid.res2(ref.mid.attn(ref.mid.res1(x)) if attn else ref.mid.res1(x))
    for level in ref.up:
        x = level(x)
    x = ref.conv_out(F.silu(ref.norm_out(x)) if silu_out else ref.norm_out(x))
    return x.clamp(-1, 1) if clamp else x


def check_vae_decoder(cls) -> bool:
    """Exercise 2.5: cls(config); forward(latent (B, 4, h, w)) -> image (B, 3, f*h, f*w) in about [-1, 1]."""
    with seeded(15):
        cases = [Case({"latent": randn(2, 4, 2, 2)}, init={"config": ENCODER_CONFIGS[0]}),
                 Case({"latent": randn(1, 4, 2, 3)}, init={"config": ENCODER_CONFIGS[1]})]

    def wrong(**how):
        return lambda ref, c: _decode(ref, c.inputs["latent"], **how)

    mistakes = [
        Mistake("the latent is not divided by the scale: undo the encoder's scaling first (divide by the "
                "config's scaling factor)", wrong(unscale="none")),
        Mistake("the latent is multiplied by the scale: the encoder multiplied, the decoder divides",
                wrong(unscale="multiply")),
        Mistake("the scale is 0.18215 whatever the config: divide by the config's scaling factor",
                wrong(scale=LATENT_SCALE)),
        Mistake("post_quant_conv is skipped: after unscaling, post_quant_conv, then conv_in",
                wrong(post_quant=False)),
        Mistake("the mid block's attention is skipped: the mid block is res1, then attn, then res2",
                wrong(attn=False)),
        Mistake("the SiLU before conv_out is missing: norm_out, SiLU, conv_out", wrong(silu_out=False)),
        Mistake("the output is clamped: the decoder returns the raw values (about [−1, 1]); clamp only when "
                "turning them into a picture", wrong(clamp=True)),
    ]
    return check_module("check_vae_decoder", cls, VAE_Decoder, cases, mistakes, exercise="2.5",
                        hint="divide by the config's scaling factor; post_quant_conv; conv_in; the mid block; each "
                             "up level (widest first); norm_out, SiLU, conv_out")


# ----------------------------------------------------------------------------------------------------------
# Exercise 2.6: measuring the latent scale
# ----------------------------------------------------------------------------------------------------------

# The measured scale must match the reference's to this relative tolerance (a float32 standard deviation).
SCALE_RTOL = 1e-4
# Small encoders of SD's structure with a scale that is not 1, and batches that do not divide the images evenly.
SCALE_CASES = ((VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4, scaling_factor=0.5), 10, 4),
               (VAEConfig(block_channels=(8, 8, 16), layers_per_block=1, norm_groups=4), 7, 3))


@torch.no_grad()
def measure_latent_scale(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """1 / std of the unscaled posterior means of `images`, encoded `batch_size` at a time (the reference of 2.6)."""
    means = [encoder(batch) / encoder.config.scaling_factor for batch in images.split(batch_size)]
    return 1.0 / torch.cat(means).float().std().item()


class _WatchedEncoder(nn.Module):
    """An encoder that records the batch size and whether noise was given, call by call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((image.shape[0], noise is not None))
        return self.inner(image, noise)


def _scale_mistakes(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> list[tuple[str, float]]:
    """(what went wrong, the value it gives) for the typical wrong measurements."""
    s = encoder.config.scaling_factor
    with torch.no_grad():
        batches = [encoder(b) for b in images.split(batch_size)]
    scaled = torch.cat(batches)
    unscaled = scaled / s
    per_channel = unscaled.transpose(0, 1).flatten(1).std(dim=1)
    return [
        ("the latents were not unscaled: the encoder's output is already multiplied by its scale, so this measures "
         "1/(scale·σ); divide the latents by the config's scaling factor first", 1 / scaled.std().item()),
        ("you returned the standard deviation σ of the latents: the scale is its inverse, 1/σ",
         unscaled.std().item()),
        ("you returned σ of the scaled latents: undo the scale, then invert the standard deviation",
         scaled.std().item()),
        ("the standard deviations of the batches were averaged: take the standard deviation of all the latents "
         "together (batches of different sizes and contents weigh differently)",
         1 / torch.stack([(b / s).std() for b in batches]).mean().item()),
        ("the scales of the batches were averaged: take one standard deviation of all the latents together, "
         "then invert it", torch.stack([1 / (b / s).std() for b in batches]).mean().item()),
        ("only the first batch was measured: encode every image, batch after batch",
         1 / (batches[0] / s).std().item()),
        ("the root mean square about 0 was taken: the standard deviation is about the latents' mean, which is "
         "not 0", 1 / unscaled.pow(2).mean().sqrt().item()),
        ("the channels' standard deviations were averaged: one factor scales all 4 channels, so take the "
         "standard deviation of all the numbers together", 1 / per_channel.mean().item()),
    ]


def check_latent_scale(fn) -> bool:
    """Exercise 2.6: fn(encoder, images (N, 3, H, W), batch_size) -> float, 1 / std of the unscaled latents."""
    name = "check_latent_scale"
    require_callable(name, fn, "a function")
    worst = 0.0
    with torch.random.fork_rng(devices=[]):
        for i, (config, n_images, batch_size) in enumerate(SCALE_CASES):
            with seeded(16 + i):
                reference_encoder = VAE_Encoder(config).eval()
                images = randn(n_images, 3, 16, 16).clamp(-1, 1)
            expected = measure_latent_scale(reference_encoder, images, batch_size)
            watched = _WatchedEncoder(reference_encoder)
            where = (f"{name} failed on input {i + 1} of {len(SCALE_CASES)} ({n_images} images "
                     f"{tuple(images.shape[1:])}, batch size {batch_size}, encoder scale {config.scaling_factor:g})")
            try:
                got = fn(watched, images.clone(), batch_size)
            except NotImplementedError:
                raise
            except Exception as e:
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}"
                                     + _hint_line("call the encoder on each batch of images; it returns the scaled "
                                                  "posterior means (no noise)") + _unknown_mistake("2.6")) from e
            biggest = max((n for n, _ in watched.calls), default=0)
            if biggest > batch_size:
                raise AssertionError(f"{where}:\n  the encoder got {biggest} images at once, more than the batch "
                                     f"size\n  Hint: encode the images a batch at a time (at 512 × 512 one image "
                                     f"through SD's encoder takes gigabytes of activations)")
            if any(noisy for _, noisy in watched.calls):
                raise AssertionError(f"{where}:\n  the encoder was given noise\n  Hint: measure the posterior "
                                     f"means, the encoder called without noise: a sample adds σ·ε, which is not the "
                                     f"spread of the pictures' latents")
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise AssertionError(f"{where}:\n  the result should be a number (a Python float), got "
                                     f"{type(got).__name__}")
            if not math.isclose(got, expected, rel_tol=SCALE_RTOL):
                named = next((hint for hint, value in _scale_mistakes(reference_encoder, images, batch_size)
                              if math.isclose(got, value, rel_tol=SCALE_RTOL)), None)
                problem = f"your scale is {got:.6g}, expected {expected:.6g}"
                raise AssertionError(f"{where}:\n  {problem}" + (_hint_line(named) if named else
                                     _hint_line("one over the standard deviation of all the unscaled latents")
                                     + _unknown_mistake("2.6")))
            worst = max(worst, abs(got - expected) / expected)
    print(f"✅ {name} passed: matches 1 / std of the unscaled latents on {len(SCALE_CASES)} random encoders "
          f"(max relative diff {worst:.1g})")
    return True
