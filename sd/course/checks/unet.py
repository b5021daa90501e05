"""Checks for notebook 05 (UNet): the timestep embedding, the residual block with time, the transformer block with
its GEGLU feed-forward, the spatial transformer, and the UNet's forward with its skip connections.

Each check compares with `sd.timestep_embedding` / `sd.unet_blocks` / `sd.unet`; the `Mistake`s below recompute
the reference the typical wrong ways (sin and cos swapped, time added before conv1, GEGLU halves swapped, eps 1e-5
in front of the transformer, skips used in the wrong order, ...), so a wrong answer is named, in words, never as code.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ...config import UNetConfig
from ...timestep_embedding import MAX_PERIOD, timestep_embedding
from ...unet import DiffusionUNET
from ...unet_blocks import GEGLU, ResBlock, SpatialTransformer, TransformerBlock
from .common import Case, Mistake, check_function, check_module, randn, seeded

# cos(t f) at t = 999 in float32: frequencies computed as 10000 ** (-i / half) instead of exp(-ln(10000) i / half)
# move the argument by one float32 step (6e-5 at 999), so the embedding check allows that much.
EMBEDDING_ATOL = 2e-4
# nn.GroupNorm's default: the wrong epsilon in front of a spatial transformer.
DEFAULT_GROUP_NORM_EPS = 1e-5
# A low-variance input (std 1e-3, variance 1e-6) makes eps 1e-5 vs 1e-6 change the normalized values by ~2x.
LOW_STD = 1e-3

# ----------------------------------------------------------------------------------------------------------
# Exercise 5.1: the sinusoidal timestep embedding
# ----------------------------------------------------------------------------------------------------------


def _embedding(timesteps: torch.Tensor, dim: int, order: str = "cos_sin", divisor: str = "half",
               log_base: float = math.log(MAX_PERIOD), sign: float = -1.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = exp(sign * log_base * i / divisor), laid out as `order` says."""
    half = dim // 2
    n = {"half": half, "dim": dim, "half_minus_1": half - 1}[divisor]
    freqs = torch.exp(sign * log_base * torch.arange(half, dtype=torch.float32) / n)   # (half,)
    args = timesteps.float()[:, None] * freqs[None, :]                                 # (B, half)
    if order == "cos_sin":
        return torch.cat([args.cos(), args.sin()], dim=-1)
    if order == "sin_cos":
        return torch.cat([args.sin(), args.cos()], dim=-1)
    if order == "interleaved":   # cos, sin, cos, sin, ...: (B, half, 2) -> (B, dim)
        return torch.stack([args.cos(), args.sin()], dim=-1).flatten(1)
    raise ValueError(order)


def check_timestep_embedding(fn) -> bool:
    """Exercise 5.1: fn(timesteps (B,), dim) -> (B, dim) = [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / h), h = dim/2."""
    with seeded(40):
        cases = [Case({"timesteps": torch.tensor([0, 1, 10, 500, 999]), "dim": 320}),
                 Case({"timesteps": torch.randint(0, 1000, (3,)), "dim": 64}),
                 Case({"timesteps": torch.tensor([981, 1]), "dim": 8})]

    def wrong(**how):
        return lambda ref, c: _embedding(*c.inputs.values(), **how)

    mistakes = [
        Mistake("sin and cos are swapped: SD puts the h cosines first, then the h sines", wrong(order="sin_cos")),
        Mistake("cos and sin are interleaved (cos, sin, cos, sin, ...): SD puts all the cosines first, then all "
                "the sines", wrong(order="interleaved")),
        Mistake("the frequencies grow: f_i = 10000^(-i/h) falls from 1 as i grows (a minus sign in the exponent)",
                wrong(sign=1.0)),
        Mistake("the exponent divides i by dim: divide by h, half of dim, so that the lowest frequency is "
                "10000^(-(h-1)/h), close to 1/10000", wrong(divisor="dim")),
        Mistake("the exponent divides i by h - 1, so the lowest frequency is exactly 1/10000: SD divides by h, "
                "half of dim (diffusers' downscale_freq_shift of 0), and stops one step short of 1/10000",
                wrong(divisor="half_minus_1")),
        Mistake("the frequencies are e^(-10000 i/h): the base is 10000, f_i = e^(-ln(10000) i/h) = 10000^(-i/h) "
                "(take the log of 10000)", wrong(log_base=float(MAX_PERIOD))),
    ]
    return check_function("check_timestep_embedding", fn, timestep_embedding, cases, mistakes,
                          atol=EMBEDDING_ATOL, exercise="5.1",
                          hint="h = dim/2 frequencies f_i = 10000^(-i/h) for i = 0 .. h-1; every timestep times "
                               "every frequency gives a (B, h) table of angles; the output is their h cosines, "
                               "then their h sines")


# ----------------------------------------------------------------------------------------------------------
# Exercise 5.2: the residual block with time
# ----------------------------------------------------------------------------------------------------------


def _res_block(ref: ResBlock, x: torch.Tensor, time_emb: torch.Tensor, time_at: str | None = "after_conv1",
               time_silu: bool = True, residual: bool = True, silu_before_norm: bool = False) -> torch.Tensor:
    """The reference block's forward with the time projection added at `time_at` (right: "after_conv1")."""
    t = ref.time_emb_proj(F.silu(time_emb) if time_silu else time_emb)[:, :, None, None]   # (B, C_out, 1, 1)

    def act(norm, y):
        return norm(F.silu(y)) if silu_before_norm else F.silu(norm(y))

    h = x + t if time_at == "input" else x
    h = act(ref.norm1, h)
    if time_at == "before_conv1":
        h = h + t
    h = ref.conv1(h)
    if time_at == "after_conv1":
        h = h + t
    h = ref.conv2(act(ref.norm2, h))
    if time_at == "end":
        h = h + t
    if not residual:
        return h
    return (x if ref.conv_shortcut is None else ref.conv_shortcut(x)) + h


def check_res_block(cls) -> bool:
    """Exercise 5.2: cls(in_channels, out_channels, time_dim, groups); forward(x (B, C_in, H, W), time_emb)."""
    with seeded(41):
        # the first case keeps the width, so a time embedding added to the input still fits and can be named
        cases = [Case({"x": randn(2, 16, 6, 6), "time_emb": randn(2, 24)},
                      init={"in_channels": 16, "out_channels": 16, "time_dim": 24, "groups": 4}),
                 Case({"x": randn(2, 8, 5, 7), "time_emb": randn(2, 24)},
                      init={"in_channels": 8, "out_channels": 16, "time_dim": 24, "groups": 4}),
                 Case({"x": 3 * randn(1, 32, 4, 4), "time_emb": 3 * randn(1, 12)},
                      init={"in_channels": 32, "out_channels": 16, "time_dim": 12, "groups": 8})]

    def wrong(**how):
        return lambda ref, c: _res_block(ref, *c.inputs.values(), **how)

    mistakes = [
        Mistake("the time embedding is added to the input, before conv1: add it to conv1's output, one shift "
                "per channel at every pixel", wrong(time_at="input")),
        Mistake("the time embedding is added before conv1: add it to conv1's output, between the two convolutions",
                wrong(time_at="before_conv1")),
        Mistake("the time embedding is added after conv2: add it to conv1's output, between the two convolutions",
                wrong(time_at="end")),
        Mistake("the time embedding is not used: turn it into one shift per output channel (SiLU, then "
                "time_emb_proj), shaped (B, C_out, 1, 1), and add it to conv1's output", wrong(time_at=None)),
        Mistake("the time embedding goes into time_emb_proj without a SiLU: SiLU first, then the projection",
                wrong(time_silu=False)),
        Mistake("the residual is missing: add the block's input (through conv_shortcut when the width changes) "
                "to its output", wrong(residual=False)),
        Mistake("SiLU comes before GroupNorm: each half is GroupNorm, then SiLU, then the convolution",
                wrong(silu_before_norm=True)),
    ]
    return check_module("check_res_block", cls, ResBlock, cases, mistakes, exercise="5.2",
                        hint="norm1, SiLU, conv1; plus the time shift (SiLU, time_emb_proj, one value per channel "
                             "at every pixel); norm2, SiLU, conv2; plus the input, through conv_shortcut when the "
                             "width changes")


# ----------------------------------------------------------------------------------------------------------
# Exercise 5.3: the transformer block, with its GEGLU feed-forward
# ----------------------------------------------------------------------------------------------------------


def _geglu(ref: GEGLU, x: torch.Tensor, value_first: bool = True, activation: str = "gelu") -> torch.Tensor:
    first, second = ref.proj(x).chunk(2, dim=-1)
    value, gate = (first, second) if value_first else (second, first)
    act = {"gelu": F.gelu, "tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu,
           "sigmoid": torch.sigmoid, "none": lambda y: y}[activation]
    return value * act(gate)


# The wrong gates a learner writes: (value first?, activation, what to say)
GEGLU_MISTAKES = [
    (False, "gelu", "the halves are swapped: the first half of the projection is the value, the second the gate"),
    (True, "tanh", "this is the tanh approximation of GELU: SD uses the exact one, g Phi(g), with erf"),
    (False, "tanh", "the halves are swapped and the GELU is the tanh approximation: value first, then the gate, "
                    "and the exact GELU (with erf)"),
    (True, "silu", "the gate goes through SiLU (that is SwiGLU): GEGLU's gate goes through GELU"),
    (True, "sigmoid", "the gate goes through a sigmoid (that is GLU): GEGLU's gate goes through GELU"),
    (True, "none", "the gate has no activation (a bilinear layer): the gate goes through GELU"),
]


def check_geglu(cls) -> bool:
    """Exercise 5.3 (its first part): cls(dim, inner_dim) with `proj`; forward(x (B, T, dim)) -> (B, T, inner_dim)."""
    with seeded(42):
        # 3 x randn spreads the gates over [-6, 6], where exact and tanh GELU differ by up to ~5e-4
        cases = [Case({"x": 3 * randn(2, 5, 16)}, init={"dim": 16, "inner_dim": 32}),
                 Case({"x": randn(1, 7, 8)}, init={"dim": 8, "inner_dim": 24})]

    def wrong(value_first, activation):
        return lambda ref, c: _geglu(ref, c.inputs["x"], value_first, activation)

    mistakes = [Mistake(say, wrong(first, act)) for first, act, say in GEGLU_MISTAKES]
    return check_module("check_geglu", cls, GEGLU, cases, mistakes, exercise="5.3",
                        hint="project to twice the inner width, split into a value (first half) and a gate "
                             "(second half), and multiply the value by the exact GELU of the gate")


def _transformer_block(ref: TransformerBlock, x: torch.Tensor, context: torch.Tensor, residual: str = "all",
                       norms: str = "pre", cross_first: bool = False, keys_from_x: bool = False,
                       norm_order: tuple[str, str, str] = ("norm1", "norm2", "norm3"),
                       gate: tuple[bool, str] = (True, "gelu")) -> torch.Tensor:
    """The reference block with residuals, norms (which one before which part), its parts' order or its GEGLU
    gate changed."""
    def self_attn(y):
        return ref.attn1(y)

    def cross_attn(y):
        return ref.attn2(y, y if keys_from_x else context)

    def feed_forward(y):
        return ref.ff.out(_geglu(ref.ff.geglu, y, *gate))

    first, second, third = (getattr(ref, name) for name in norm_order)
    parts = [(first, self_attn), (second, cross_attn), (third, feed_forward)]
    if cross_first:
        parts[0], parts[1] = (ref.norm1, cross_attn), (ref.norm2, self_attn)
    for i, (norm, layer) in enumerate(parts):
        keep = residual == "all" or (residual == "not_ff" and i < 2)
        if norms == "pre":
            x = (x if keep else 0) + layer(norm(x))
        elif norms == "post":
            x = norm((x if keep else 0) + layer(x))
        else:   # no norms
            x = (x if keep else 0) + layer(x)
    return x


def check_transformer_block(cls) -> bool:
    """Exercise 5.3: cls(dim, context_dim, heads) with norm1, attn1, norm2, attn2, norm3, ff (ff.geglu.proj, ff.out);
    forward(x (B, T, dim), context (B, S, context_dim)) -> (B, T, dim)."""
    with seeded(43):
        # the first case has context_dim == dim, so keys taken from x instead of the context can be named
        cases = [Case({"x": randn(2, 6, 32), "context": randn(2, 5, 32)},
                      init={"dim": 32, "context_dim": 32, "heads": 4}),
                 Case({"x": randn(1, 9, 16), "context": randn(1, 4, 24)},
                      init={"dim": 16, "context_dim": 24, "heads": 2})]

    def wrong(**how):
        return lambda ref, c: _transformer_block(ref, c.inputs["x"], c.inputs["context"], **how)

    mistakes = [
        Mistake("the residuals are missing: each part adds its output to its input x", wrong(residual="none")),
        Mistake("the feed-forward's residual is missing: add the feed-forward's output to x",
                wrong(residual="not_ff")),
        Mistake("the norms come after the residual (post-norm): SD normalises the input of each part (pre-norm) "
                "and adds the part's output to the unnormalised x", wrong(norms="post")),
        Mistake("the LayerNorms are missing: each part sees its input normalised by its own LayerNorm",
                wrong(norms="none")),
        Mistake("cross-attention comes before self-attention: the order is self-attention (attn1), "
                "cross-attention (attn2), feed-forward (ff)", wrong(cross_first=True)),
        Mistake("the cross-attention's keys and values come from x: they come from the text, the context",
                wrong(keys_from_x=True)),
    ]
    mistakes += [Mistake(f"in the feed-forward's GEGLU, {say}", wrong(gate=(first, act)))
                 for first, act, say in GEGLU_MISTAKES]
    # the check gives each LayerNorm its own random scale and shift, so a norm in the wrong place shows
    for order in itertools.permutations(("norm1", "norm2", "norm3")):
        if order != ("norm1", "norm2", "norm3"):
            mistakes.append(Mistake(
                f"the LayerNorms are in the wrong places ({order[0]} before attn1, {order[1]} before attn2, "
                f"{order[2]} before ff): each part has its own, attn1 after norm1, attn2 after norm2, ff after "
                "norm3", wrong(norm_order=order)))
    return check_module("check_transformer_block", cls, TransformerBlock, cases, mistakes, exercise="5.3",
                        hint="three pre-norm parts, each adding its output to x: self-attention after norm1, "
                             "cross-attention to the context after norm2, the GEGLU feed-forward after norm3")


# ----------------------------------------------------------------------------------------------------------
# Exercise 5.4: the spatial transformer, built from its diagram
# ----------------------------------------------------------------------------------------------------------


def _spatial_transformer(ref: SpatialTransformer, x: torch.Tensor, context: torch.Tensor,
                         eps: float | None = None, residual: bool = True, tokens: str = "permute",
                         norm: str = "before_proj_in") -> torch.Tensor:
    """The reference module's forward with the GroupNorm epsilon, the residual or the reshapes changed."""
    b, c, h, w = x.shape
    gn = ref.norm
    normalize = (lambda y: F.group_norm(y, gn.num_groups, gn.weight, gn.bias, eps)) if eps is not None else gn
    if norm == "before_proj_in":
        y = ref.proj_in(normalize(x))
    elif norm == "after_proj_in":
        y = normalize(ref.proj_in(x))
    else:
        y = ref.proj_in(x)
    if tokens == "permute":
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)        # (B, C, H, W) -> (B, H*W, C)
    elif tokens == "transposed_back":                         # in as (B, H*W, C), out read as (B, W, H, C)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
    else:                                                     # a bare reshape mixes channels and pixels
        y = y.reshape(b, h * w, c)
    for block in ref.blocks:
        y = block(y, context)
    if tokens == "permute":
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
    elif tokens == "transposed_back":
        y = y.reshape(b, w, h, c).permute(0, 3, 2, 1)
    else:
        y = y.reshape(b, c, h, w)
    y = ref.proj_out(y)
    return x + y if residual else y


def check_spatial_transformer(cls) -> bool:
    """Exercise 5.4: cls(channels, context_dim, heads, depth, groups) with norm, proj_in, blocks, proj_out;
    forward(x (B, C, H, W), context (B, S, D)) -> (B, C, H, W)."""
    with seeded(44):
        # the first input has a tiny variance, so the GroupNorm's epsilon (1e-6 vs 1e-5) shows in the output
        cases = [Case({"x": LOW_STD * randn(2, 32, 6, 6), "context": randn(2, 5, 16)},
                      init={"channels": 32, "context_dim": 16, "heads": 4, "depth": 1, "groups": 8}),
                 Case({"x": randn(1, 16, 4, 6), "context": randn(1, 3, 24)},
                      init={"channels": 16, "context_dim": 24, "heads": 2, "depth": 2, "groups": 4})]

    def wrong(**how):
        return lambda ref, c: _spatial_transformer(ref, c.inputs["x"], c.inputs["context"], **how)

    mistakes = [
        Mistake(f"the GroupNorm in front of the transformer has epsilon {DEFAULT_GROUP_NORM_EPS:g} (PyTorch's "
                f"default): SD uses 1e-6 there; it matters when the features have a small variance",
                wrong(eps=DEFAULT_GROUP_NORM_EPS)),
        Mistake("the residual is missing: the output is the input plus what proj_out gives",
                wrong(residual=False)),
        Mistake("the pixels become tokens with a bare reshape, which mixes channels and pixels: move the channels "
                "last first, (B, C, H, W) to (B, H, W, C), then flatten to (B, H*W, C), and the reverse on the "
                "way back", wrong(tokens="reshape")),
        Mistake("the tokens go back to an image with height and width exchanged: undo the flattening as "
                "(B, H, W, C), then move the channels back to second place", wrong(tokens="transposed_back")),
        Mistake("the GroupNorm is missing: normalise first, then proj_in", wrong(norm="none")),
        Mistake("the GroupNorm comes after proj_in: normalise first, then proj_in", wrong(norm="after_proj_in")),
    ]
    return check_module("check_spatial_transformer", cls, SpatialTransformer, cases, mistakes, exercise="5.4",
                        hint="GroupNorm (epsilon 1e-6), proj_in, the pixels as H*W tokens of C features, each "
                             "transformer block with the context, back to (B, C, H, W), proj_out, plus the input")


# ----------------------------------------------------------------------------------------------------------
# Exercise 5.5: the UNet's forward, with its skip connections
# ----------------------------------------------------------------------------------------------------------


def _unet_forward(unet: DiffusionUNET, latent: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor,
                  pop_order: str = "stack", concat: str = "x_first", skip_after: str = "attn",
                  final_norm: bool = True, mid: bool = True) -> torch.Tensor:
    """DiffusionUNET's forward written out, with the skips or the last layers handled a chosen (wrong) way."""
    cfg = unet.config
    emb = unet.time_embedding(timestep_embedding(timestep, cfg.block_channels[0]))   # (B,) -> (B, 4*C0)
    x = unet.conv_in(latent)
    skips = [x]
    for level in unet.down:
        for j, res in enumerate(level.res):
            x = res(x, emb)
            before_attn = x
            if level.attn is not None:
                x = level.attn[j](x, context)
            skips.append(before_attn if skip_after == "res" else x)
        if level.downsample is not None:
            x = level.downsample(x)
            skips.append(x)
    if mid:
        x = unet.mid(x, emb, context)
    for level in unet.up:
        n = len(level.res)
        # "stack": the last skip first; "level_fifo": each level's skips in the order they were pushed
        mine = [skips.pop() for _ in range(n)] if pop_order == "stack" else [skips.pop(-n + j) for j in range(n)]
        for j, res in enumerate(level.res):
            pair = [x, mine[j]] if concat == "x_first" else [mine[j], x]
            x = res(torch.cat(pair, dim=1), emb)
            if level.attn is not None:
                x = level.attn[j](x, context)
        if level.upsample is not None:
            x = level.upsample(x)
    return unet.conv_out(F.silu(unet.norm_out(x)) if final_norm else x)


def _unet_cases() -> list[Case]:
    """Small UNets with SD's structure; the first has one width everywhere, so skips in the wrong order still fit."""
    equal_widths = UNetConfig(block_channels=(16, 16, 16, 16), context_dim=12, heads=2, norm_groups=4)
    growing = UNetConfig(block_channels=(8, 16, 24, 24), context_dim=12, heads=2, norm_groups=4)
    with seeded(45):
        return [Case({"latent": randn(2, 4, 16, 16), "context": randn(2, 3, 12), "timestep": torch.tensor([999, 10])},
                     init={"config": equal_widths}),
                Case({"latent": randn(1, 4, 8, 16), "context": randn(1, 5, 12), "timestep": torch.tensor([500])},
                     init={"config": growing})]


def check_unet_forward(cls) -> bool:
    """Exercise 5.5: cls a subclass of sd.DiffusionUNET whose forward(latent, context, timestep (B,)) you wrote."""
    def wrong(**how):
        return lambda ref, c: _unet_forward(ref, *c.inputs.values(), **how)

    mistakes = [
        Mistake("the skips of each up level are used in the order they were pushed: the skips are a stack, "
                "so each up residual block takes the last one pushed (last in, first out)",
                wrong(pop_order="level_fifo")),
        Mistake("the concatenation is the wrong way round: the up path's features first, then the skip, joined "
                "along the channels", wrong(concat="skip_first")),
        Mistake("the skip is saved before the spatial transformer: push what the level's transformer gives "
                "(residual block, then transformer, then push)", wrong(skip_after="res")),
        Mistake("the final GroupNorm and SiLU are missing: norm_out, SiLU, then conv_out",
                wrong(final_norm=False)),
        Mistake("the mid block is skipped: it runs between the down and the up path, with the time embedding "
                "and the context", wrong(mid=False)),
    ]
    return check_module("check_unet_forward", cls, DiffusionUNET, _unet_cases(), mistakes, exercise="5.5",
                        hint="the skips are a stack: push conv_in's output, then every residual block's (or its "
                             "transformer's) output and every downsampled output; on the way up, each residual "
                             "block takes the last one pushed, joined after x along the channels")
