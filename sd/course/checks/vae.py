"""Checks for notebook 02 (the VAE): residual block, attention block, reparameterization, downsampling, encoder, decoder.

Each check compares with `sd.vae_blocks`, `sd.encoder` and `sd.decoder`; the `Mistake`s below recompute the
reference the typical wrong ways (GroupNorm eps 1e-5, no skip connection, logvar used as the standard deviation,
symmetric padding, no 0.18215, ...), so a wrong answer is named, not just reported.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ...config import LATENT_SCALE, VAEConfig
from ...decoder import VAE_Decoder
from ...encoder import LOGVAR_MAX, LOGVAR_MIN, VAE_Encoder
from ...vae_blocks import VAE_NORM_EPS, VAE_AttentionBlock, VAE_Downsample, VAE_ResidualBlock
from .common import Case, Mistake, check_function, check_module, randn, seeded

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
     "conv_shortcut is missing: when in_channels != out_channels the skip x must change width too, through a "
     "1x1 convolution nn.Conv2d(in_channels, out_channels, 1), before it is added to h"),
    (("unexpected in yours: conv_shortcut",),
     "conv_shortcut exists although the widths are equal: create it only when in_channels != out_channels "
     "(SD's checkpoint has no shortcut weights there: the skip is x itself); set it to None otherwise"),
    (("raised RuntimeError", "must match the size"),
     "x and h have different widths when in_channels != out_channels: pass x through conv_shortcut (the 1x1 "
     "convolution) before adding it, skip = conv_shortcut(x)"),
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
        Mistake("the GroupNorm epsilon is PyTorch's default 1e-5: SD's VAE uses eps=1e-6 in every GroupNorm "
                "(nn.GroupNorm(groups, channels, eps=1e-6)); it matters on flat, low-contrast regions",
                wrong(eps=TORCH_NORM_EPS)),
        Mistake("the skip connection is missing: return skip + h, where skip is x (or conv_shortcut(x))",
                wrong(skip="none")),
        Mistake("the skip starts from the normalised input: add the block's input x itself, "
                "not norm1(x)", wrong(skip="normed")),
        Mistake("the activation is ReLU: SD uses SiLU, x * sigmoid(x) (F.silu)", wrong(act="relu")),
        Mistake("the activation is missing: each unit is GroupNorm, then SiLU, then the convolution",
                wrong(act="none")),
        Mistake("the order is conv, norm, SiLU: SD's blocks are pre-activation, norm -> SiLU -> conv, twice",
                wrong(order="conv_norm_act")),
    ]
    return _with_pointed_hints(
        lambda: check_module("check_vae_residual_block", cls, VAE_ResidualBlock, cases, mistakes,
                             hint="h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); return skip + h with "
                                  "skip = x, or conv_shortcut(x) when the widths differ; GroupNorm eps=1e-6"),
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
        Mistake("the residual connection is missing: return x + out (the block's input plus the attention)",
                wrong(residual="none")),
        Mistake("the residual adds the normalised input: return x + out with x the block's input, "
                "not group_norm(x)", wrong(residual="normed")),
        Mistake("the GroupNorm is skipped: normalise x with self.group_norm before q, k, v",
                wrong(norm=False)),
        Mistake("the GroupNorm epsilon is 1e-5: SD's VAE uses eps=1e-6", wrong(eps=TORCH_NORM_EPS)),
        Mistake("the scores are not scaled: multiply Q K^T by 1/sqrt(C) (one head of C channels)",
                wrong(scale="none")),
        Mistake("the scores are divided by C: the scale is 1/sqrt(C)", wrong(scale="c")),
        Mistake("the pixels are made tokens the wrong way: view (B, C, H, W) as (B, C, H*W) and then "
                "transpose(1, 2) to (B, H*W, C); a direct reshape to (B, H*W, C) mixes channels and pixels",
                wrong(tokens="no_transpose")),
        Mistake("the output is turned back into an image the wrong way: transpose (B, H*W, C) to (B, C, H*W) "
                "before reshaping to (B, C, H, W)", wrong(tokens="back_no_transpose")),
        Mistake("the softmax runs over the queries (dim -2): each pixel's weights over the others must sum "
                "to 1, softmax(dim=-1)", wrong(softmax_dim=-2)),
        Mistake("the output projection is missing: apply self.to_out to the attention's output",
                wrong(out_proj=False)),
    ]
    return check_module("check_vae_attention_block", cls, VAE_AttentionBlock, cases, mistakes,
                        hint="h = group_norm(x) as tokens (B, C, H*W) -> (B, H*W, C); softmax(q k^T / sqrt(C)) v; "
                             "to_out; back to (B, C, H, W); return x + h")


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
    """Exercise 2.3: fn(mean, logvar, noise, scale=0.18215) = (mean + exp(logvar/2) * noise) * scale, clamped logvar."""
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
        Mistake("the latent is not scaled: multiply by scale (0.18215 for SD) so the latents have about unit "
                "variance, as the diffusion model expects", wrong(scaled="none")),
        Mistake("only the mean is scaled: scale the whole sample, (mean + std * noise) * scale",
                wrong(scaled="mean")),
        Mistake("the latent is divided by the scale: the encoder multiplies by it (the decoder divides)",
                wrong(scaled="divide")),
        Mistake("the log-variance is used as the standard deviation: std = exp(logvar / 2)",
                wrong(std="logvar")),
        Mistake("exp(logvar) is the variance, not the standard deviation: std = exp(logvar / 2)",
                wrong(std="exp")),
        Mistake("the log-variance is not clamped: logvar.clamp(-30, 20) first, as SD does (huge values "
                "would blow the sample up)", wrong(clamp=False)),
    ]

    def ignores_scale(ref, c):   # 0.18215 written in, the `scale` argument ignored
        return _reparam(*c.inputs.values(), LATENT_SCALE) if "scale" in c.kwargs else None

    mistakes.append(Mistake("the scale argument is ignored (0.18215 written in): multiply by `scale`; the "
                            "course's small model has its own factor", ignores_scale))
    return check_function("check_reparameterize", fn, reparameterize, cases, mistakes,
                          reference_name="the sampling of sd.encoder.VAE_Encoder.forward",
                          hint="noise None: return mean * scale; else logvar = logvar.clamp(-30, 20), "
                               "std = exp(logvar / 2), return (mean + std * noise) * scale")


# ----------------------------------------------------------------------------------------------------------
# Exercise 2.4: the downsampling
# ----------------------------------------------------------------------------------------------------------

def check_vae_downsample(cls) -> bool:
    """Exercise 2.4: cls(channels) with a 3x3 stride-2 conv without padding; forward pads right and bottom first."""
    with seeded(13):
        cases = [Case({"x": randn(2, 4, 8, 8)}, init={"channels": 4}),
                 Case({"x": randn(1, 8, 6, 10)}, init={"channels": 8})]

    def padded(pad, mode="constant"):
        return lambda ref, c: F.conv2d(F.pad(c.inputs["x"], pad, mode=mode), ref.conv.weight, ref.conv.bias,
                                       stride=2)

    mistakes = [
        Mistake("the padding is on the left and the top (what symmetric padding, or padding=1 in the conv, "
                "amounts to here): SD pads only the right and the bottom, F.pad(x, (0, 1, 0, 1)), F.pad's tuple "
                "being (left, right, top, bottom); same shape, other numbers", padded(PAD_SYMMETRIC)),
        Mistake("the padding repeats the edge pixels: pad with zeros (F.pad's default mode)",
                padded(PAD_RIGHT_BOTTOM, mode="replicate")),
    ]
    return check_module("check_vae_downsample", cls, VAE_Downsample, cases, mistakes,
                        hint="return self.conv(F.pad(x, (0, 1, 0, 1))): one zero column on the right and one "
                             "zero row at the bottom, then the 3x3 stride-2 convolution; (H, W) -> (H/2, W/2)")


# ----------------------------------------------------------------------------------------------------------
# Exercises 2.5 and 2.6: the encoder and the decoder, assembled from the blocks
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
    """Exercise 2.5: cls(config); forward(image (B, 3, H, W), noise=None) -> scaled latent (B, 4, H/f, W/f)."""
    with seeded(14):
        cases = [Case({"image": randn(2, 3, 16, 16)}, init={"config": ENCODER_CONFIGS[0]}),
                 Case({"image": randn(1, 3, 16, 24), "noise": randn(1, 4, 2, 3)}, init={"config": ENCODER_CONFIGS[1]})]

    def wrong(**how):
        return lambda ref, c: _encode(ref, c.inputs["image"], c.inputs.get("noise"), **how)

    mistakes = [
        Mistake("the downsampling pads the left and the top (symmetric padding, or padding=1 in the conv): SD pads "
                "the right and the bottom only, F.pad(x, (0, 1, 0, 1)), then the stride-2 conv",
                wrong(pad=PAD_SYMMETRIC)),
        Mistake("the latent is not scaled: the encoder returns reparameterize(mean, logvar, noise, "
                "self.config.scaling_factor)", wrong(scale=1.0)),
        Mistake("the scale is 0.18215 whatever the config: pass self.config.scaling_factor (the course's small "
                "model has its own)", wrong(scale=LATENT_SCALE)),
        Mistake("the mid block's attention is skipped: mid.res1, then mid.attn, then mid.res2", wrong(attn=False)),
        Mistake("the SiLU before conv_out is missing: norm_out, SiLU, conv_out", wrong(silu_out=False)),
        Mistake("quant_conv is skipped: its 1x1 convolution turns conv_out's 8 channels into mean and logvar",
                wrong(quant=False)),
        Mistake("mean and logvar are swapped: the first 4 channels are the mean, x.chunk(2, dim=1) gives "
                "(mean, logvar)", wrong(swap=True)),
        Mistake("the noise is ignored: with noise, sample mean + std * noise", wrong(use_noise=False)),
    ]
    return check_module("check_vae_encoder", cls, VAE_Encoder, cases, mistakes,
                        hint="conv_in; for each level: its res blocks, then its downsample (if any); mid.res1, "
                             "mid.attn, mid.res2; norm_out, SiLU, conv_out; quant_conv; mean, logvar = chunk(2, dim=1); "
                             "reparameterize with self.config.scaling_factor")


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
    """Exercise 2.6: cls(config); forward(latent (B, 4, h, w)) -> image (B, 3, f*h, f*w) in about [-1, 1]."""
    with seeded(15):
        cases = [Case({"latent": randn(2, 4, 2, 2)}, init={"config": ENCODER_CONFIGS[0]}),
                 Case({"latent": randn(1, 4, 2, 3)}, init={"config": ENCODER_CONFIGS[1]})]

    def wrong(**how):
        return lambda ref, c: _decode(ref, c.inputs["latent"], **how)

    mistakes = [
        Mistake("the latent is not divided by the scale: undo the encoder's scaling first, "
                "latent / self.config.scaling_factor", wrong(unscale="none")),
        Mistake("the latent is multiplied by the scale: the encoder multiplied, the decoder divides",
                wrong(unscale="multiply")),
        Mistake("the scale is 0.18215 whatever the config: divide by self.config.scaling_factor",
                wrong(scale=LATENT_SCALE)),
        Mistake("post_quant_conv is skipped: after unscaling, post_quant_conv, then conv_in",
                wrong(post_quant=False)),
        Mistake("the mid block's attention is skipped: mid.res1, then mid.attn, then mid.res2", wrong(attn=False)),
        Mistake("the SiLU before conv_out is missing: norm_out, SiLU, conv_out", wrong(silu_out=False)),
        Mistake("the output is clamped: the decoder returns the raw values (about [-1, 1]); clamp only when "
                "turning them into a picture", wrong(clamp=True)),
    ]
    return check_module("check_vae_decoder", cls, VAE_Decoder, cases, mistakes,
                        hint="x = latent / self.config.scaling_factor; post_quant_conv; conv_in; mid.res1, "
                             "mid.attn, mid.res2; each level of self.up (widest first); norm_out, SiLU, conv_out")
