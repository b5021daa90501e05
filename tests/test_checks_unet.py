"""The exercise checks of notebook 05 (UNet): the reference passes, plausible wrong implementations are named.

The wrong implementations below are written the way a learner would write them (not taken from the checks),
so each test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd
from sd.attention import SelfAttention
from sd.course.checks import (check_geglu, check_res_block, check_spatial_transformer, check_timestep_embedding,
                       check_transformer_block, check_unet_forward, pick)
from sd.cross_attention import CrossAttention
from sd.timestep_embedding import timestep_embedding
from sd.unet_blocks import GEGLU, FeedForward, ResBlock, SpatialTransformer, TransformerBlock
from tests.check_helpers import program_text, rejects, rejects_unrecognised


def rejects_in_words(check, impl, *fragments: str) -> str:
    """rejects(), and the message names the mistake in words: no program text."""
    message = rejects(check, impl, *fragments)
    found = program_text(message)
    assert found is None, f"the check's message shows program text ({found}):\n{message}"
    return message


# ---------------------------------------------------------------------------------------------------------
# 5.1 timestep embedding, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def embedding_with_pow(timesteps, dim):
    """Right, written differently: 10000 ** (-i / half) and torch.outer."""
    half = dim // 2
    freqs = 10000 ** (-torch.arange(half) / half)
    args = torch.outer(timesteps.float(), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def embedding_sin_first(timesteps, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = timesteps[:, None].float() * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def embedding_divided_by_dim(timesteps, dim):
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2) / dim)
    args = timesteps[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def embedding_base_1000(timesteps, dim):
    half = dim // 2
    freqs = 1000 ** (-torch.arange(half) / half)
    args = timesteps[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def embedding_interleaved(timesteps, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = timesteps[:, None].float() * freqs
    out = torch.zeros(len(timesteps), dim)
    out[:, 0::2], out[:, 1::2] = torch.cos(args), torch.sin(args)
    return out


# ---------------------------------------------------------------------------------------------------------
# 5.2 residual block: the exercise's constructor, forward wrong in one way each
# ---------------------------------------------------------------------------------------------------------

class MyResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_dim, groups=32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def time(self, time_emb):
        return self.time_emb_proj(F.silu(time_emb)).unsqueeze(-1).unsqueeze(-1)

    def skip(self, x):
        return x if self.conv_shortcut is None else self.conv_shortcut(x)

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(time_emb)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockTimeBeforeConv1(MyResBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x + self.time(time_emb))))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockTimeWithoutSiLU(MyResBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(time_emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockTimeAtTheEnd(MyResBlock):
    def forward(self, x, time_emb):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return self.skip(x) + h + self.time(time_emb)


class ResBlockWithoutResidual(MyResBlock):
    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(time_emb)
        return self.conv2(F.silu(self.norm2(h)))


# ---------------------------------------------------------------------------------------------------------
# 5.3 the transformer block with its GEGLU feed-forward: GEGLU first
# ---------------------------------------------------------------------------------------------------------

class MyGEGLU(nn.Module):
    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        h = self.proj(x)
        n = h.shape[-1] // 2
        return h[..., :n] * F.gelu(h[..., n:])


class GEGLUGateFirst(MyGEGLU):
    def forward(self, x):
        gate, value = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class GEGLUTanh(MyGEGLU):
    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.GELU(approximate="tanh")(gate)


class GEGLUSiLU(MyGEGLU):
    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.silu(gate)


# ---------------------------------------------------------------------------------------------------------
# 5.3 the transformer block itself
# ---------------------------------------------------------------------------------------------------------

class MyTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class TransformerBlockWithoutResiduals(MyTransformerBlock):
    def forward(self, x, context):
        x = self.attn1(self.norm1(x))
        x = self.attn2(self.norm2(x), context)
        return self.ff(self.norm3(x))


class TransformerBlockPostNorm(MyTransformerBlock):
    def forward(self, x, context):
        x = self.norm1(x + self.attn1(x))
        x = self.norm2(x + self.attn2(x, context))
        return self.norm3(x + self.ff(x))


class TransformerBlockSwappedNorms(MyTransformerBlock):
    """norm1 and norm2 swapped: with fresh LayerNorms (scale 1, shift 0) this computes the same numbers."""
    def forward(self, x, context):
        x = x + self.attn1(self.norm2(x))
        x = x + self.attn2(self.norm1(x), context)
        return x + self.ff(self.norm3(x))


class TransformerBlockRotatedNorms(MyTransformerBlock):
    """norm2 before attn1, norm3 before attn2, norm1 before ff."""
    def forward(self, x, context):
        x = x + self.attn1(self.norm2(x))
        x = x + self.attn2(self.norm3(x), context)
        return x + self.ff(self.norm1(x))


class TransformerBlockCrossFirst(MyTransformerBlock):
    def forward(self, x, context):
        x = x + self.attn2(self.norm1(x), context)
        x = x + self.attn1(self.norm2(x))
        return x + self.ff(self.norm3(x))


# ---------------------------------------------------------------------------------------------------------
# 5.4 spatial transformer
# ---------------------------------------------------------------------------------------------------------

class MySpatialTransformer(nn.Module):
    def __init__(self, channels, context_dim, heads, depth=1, groups=32, eps=1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def tokens(self, x):
        b, c, h, w = x.shape
        return x.view(b, c, h * w).transpose(1, 2)     # (B, H*W, C)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.tokens(self.proj_in(self.norm(x)))
        for block in self.blocks:
            t = block(t, context)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


class SpatialTransformerDefaultEps(MySpatialTransformer):
    def __init__(self, channels, context_dim, heads, depth=1, groups=32):
        super().__init__(channels, context_dim, heads, depth, groups)
        self.norm = nn.GroupNorm(groups, channels)     # PyTorch's default eps, 1e-5


class SpatialTransformerWithoutResidual(MySpatialTransformer):
    def forward(self, x, context):
        return super().forward(x, context) - x


class SpatialTransformerBareReshape(MySpatialTransformer):
    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.blocks:
            t = block(t, context)
        return x + self.proj_out(t.reshape(b, c, h, w))


# ---------------------------------------------------------------------------------------------------------
# 5.5 the UNet forward, with its skips
# ---------------------------------------------------------------------------------------------------------

class MyUNet(sd.DiffusionUNET):
    """A learner's forward; the flags below each make it wrong in one way."""
    pop_first = False         # skips.pop(0): a queue instead of a stack
    cat_skip_first = False    # torch.cat([skip, x])
    level_in_push_order = False

    def forward(self, latent, context, timestep):
        emb = self.time_embedding(timestep_embedding(timestep, self.config.block_channels[0]))
        x = self.conv_in(latent)
        skips = [x]
        for level in self.down:
            for j in range(len(level.res)):
                x = level.res[j](x, emb)
                if level.attn is not None:
                    x = level.attn[j](x, context)
                skips.append(x)
            if level.downsample is not None:
                x = level.downsample(x)
                skips.append(x)
        x = self.mid(x, emb, context)
        for level in self.up:
            n = len(level.res)
            if self.level_in_push_order:
                mine, skips = skips[-n:], skips[:-n]
            for j in range(n):
                if self.level_in_push_order:
                    skip = mine[j]
                else:
                    skip = skips.pop(0) if self.pop_first else skips.pop()
                x = torch.cat([skip, x] if self.cat_skip_first else [x, skip], dim=1)
                x = level.res[j](x, emb)
                if level.attn is not None:
                    x = level.attn[j](x, context)
            if level.upsample is not None:
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class UNetPopsTheFirstSkip(MyUNet):
    pop_first = True


class UNetSkipsOfALevelInPushOrder(MyUNet):
    level_in_push_order = True


class UNetConcatenatesSkipFirst(MyUNet):
    cat_skip_first = True


# ---------------------------------------------------------------------------------------------------------
# The references pass; implementations written differently pass too
# ---------------------------------------------------------------------------------------------------------

def test_unet_checks_pass_the_reference_implementations_with_one_line(capsys):
    assert check_timestep_embedding(timestep_embedding) is True
    assert check_res_block(ResBlock) is True
    assert check_geglu(GEGLU) is True
    assert check_transformer_block(TransformerBlock) is True
    assert check_spatial_transformer(SpatialTransformer) is True
    assert check_unet_forward(sd.DiffusionUNET) is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)
    assert "check_unet_forward passed: matches sd.unet.DiffusionUNET on 2 random inputs" in lines[5]


def test_unet_checks_pass_correct_learner_implementations_written_differently():
    assert check_timestep_embedding(embedding_with_pow)   # differs from exp() by float32 rounding only
    assert check_res_block(MyResBlock)
    assert check_geglu(MyGEGLU)
    assert check_transformer_block(MyTransformerBlock)
    assert check_spatial_transformer(MySpatialTransformer)
    assert check_unet_forward(MyUNet)


# ---------------------------------------------------------------------------------------------------------
# Wrong implementations are rejected, and the message names the mistake
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl, mistake", [
    (embedding_sin_first, "sin and cos are swapped"),
    (embedding_interleaved, "interleaved"),
    (embedding_divided_by_dim, "divides i by dim"),
])
def test_check_timestep_embedding_names_the_mistake(impl, mistake):
    rejects_in_words(check_timestep_embedding, impl, "check_timestep_embedding failed", "timesteps (5,), dim 320",
                     mistake)


def embedding_divided_by_half_minus_one(timesteps, dim):
    """The lowest frequency exactly 1/10000, as "from 1 down to 1/10000" read literally would give."""
    half = dim // 2
    freqs = 10000 ** (-torch.arange(half) / (half - 1))
    args = timesteps[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_check_timestep_embedding_names_frequencies_that_reach_exactly_one_over_10000():
    rejects_in_words(check_timestep_embedding, embedding_divided_by_half_minus_one, "divides i by h - 1")


def test_check_timestep_embedding_points_to_the_hints_for_a_base_it_does_not_know():
    message = rejects_unrecognised(check_timestep_embedding, embedding_base_1000, "5.1")
    assert "10000^(-i/h)" in message    # the words of the general hint


@pytest.mark.parametrize("cls, mistake", [
    (ResBlockTimeBeforeConv1, "added to the input, before conv1"),
    (ResBlockTimeWithoutSiLU, "without a SiLU"),
    (ResBlockTimeAtTheEnd, "added after conv2"),
    (ResBlockWithoutResidual, "residual is missing"),
])
def test_check_res_block_names_the_mistake(cls, mistake):
    rejects_in_words(check_res_block, cls, "check_res_block failed", mistake)


class ResBlockTimeDoubled(MyResBlock):
    def forward(self, x, time_emb):   # the time shift added twice: a mistake the check does not list
        h = self.conv1(F.silu(self.norm1(x))) + 2 * self.time(time_emb)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def test_check_res_block_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_res_block, ResBlockTimeDoubled, "5.2")


@pytest.mark.parametrize("cls, mistake", [
    (GEGLUGateFirst, "halves are swapped"),
    (GEGLUTanh, "tanh approximation"),
    (GEGLUSiLU, "SwiGLU"),
])
def test_check_geglu_names_the_mistake(cls, mistake):
    rejects_in_words(check_geglu, cls, "check_geglu failed", mistake)


class GEGLUGateSquared(MyGEGLU):
    def forward(self, x):   # the gate squared before the GELU: a mistake the check does not list
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate ** 2)


def test_check_geglu_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_geglu, GEGLUGateSquared, "5.3")


@pytest.mark.parametrize("cls, mistake", [
    (TransformerBlockWithoutResiduals, "residuals are missing"),
    (TransformerBlockPostNorm, "post-norm"),
    (TransformerBlockCrossFirst, "cross-attention comes before self-attention"),
    (TransformerBlockSwappedNorms, "LayerNorms are in the wrong places (norm2 before attn1, norm1 before attn2"),
    (TransformerBlockRotatedNorms, "LayerNorms are in the wrong places (norm2 before attn1, norm3 before attn2, "
                                   "norm1 before ff)"),
])
def test_check_transformer_block_names_the_mistake(cls, mistake):
    rejects_in_words(check_transformer_block, cls, "check_transformer_block failed", mistake)


class FeedForwardGateFirst(nn.Module):
    """The feed-forward with sd's names, its GEGLU's halves swapped."""

    def __init__(self, dim):
        super().__init__()
        self.geglu = GEGLUGateFirst(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.out(self.geglu(x))


class TransformerBlockGateFirst(MyTransformerBlock):
    """The block built from the diagram, with a GEGLU whose halves are swapped."""

    def __init__(self, dim, context_dim, heads):
        super().__init__(dim, context_dim, heads)
        self.ff = FeedForwardGateFirst(dim)


def test_check_transformer_block_names_a_wrong_geglu_inside_the_block():
    rejects_in_words(check_transformer_block, TransformerBlockGateFirst, "in the feed-forward's GEGLU",
                     "halves are swapped")


class TransformerBlockWithAttentionBiases(MyTransformerBlock):
    def __init__(self, dim, context_dim, heads):
        super().__init__(dim, context_dim, heads)
        self.attn1 = SelfAttention(dim, heads, qkv_bias=True)   # SD's self-attention has no q/k/v bias


def test_check_transformer_block_lists_the_weights_a_constructor_has_too_many_of():
    rejects(check_transformer_block, TransformerBlockWithAttentionBiases, "unexpected in yours: attn1.to_q.bias")


class TransformerBlockHalfCrossAttention(MyTransformerBlock):
    def forward(self, x, context):   # the cross-attention's output halved: a mistake the check does not list
        x = x + self.attn1(self.norm1(x))
        x = x + 0.5 * self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def test_check_transformer_block_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_transformer_block, TransformerBlockHalfCrossAttention, "5.3")


@pytest.mark.parametrize("cls, mistake", [
    (SpatialTransformerDefaultEps, "SD uses 1e-6 there"),
    (SpatialTransformerWithoutResidual, "residual is missing"),
    (SpatialTransformerBareReshape, "bare reshape"),
])
def test_check_spatial_transformer_names_the_mistake(cls, mistake):
    rejects_in_words(check_spatial_transformer, cls, "check_spatial_transformer failed", mistake)


def test_check_spatial_transformer_catches_the_epsilon_on_a_low_variance_input():
    message = rejects(check_spatial_transformer, SpatialTransformerDefaultEps, "random input 1 of 2")
    assert "epsilon 1e-05 (PyTorch's default)" in message


class SpatialTransformerHeightAndWidthExchanged(MySpatialTransformer):
    def forward(self, x, context):   # tokens read back as (B, W, H, C)
        b, c, h, w = x.shape
        t = self.tokens(self.proj_in(self.norm(x)))
        for block in self.blocks:
            t = block(t, context)
        return x + self.proj_out(t.reshape(b, w, h, c).permute(0, 3, 2, 1))


class SpatialTransformerProjectedTwice(MySpatialTransformer):
    def forward(self, x, context):   # proj_in applied twice: a mistake the check does not list
        b, c, h, w = x.shape
        t = self.tokens(self.proj_in(self.proj_in(self.norm(x))))
        for block in self.blocks:
            t = block(t, context)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


def test_check_spatial_transformer_names_height_and_width_exchanged():
    rejects_in_words(check_spatial_transformer, SpatialTransformerHeightAndWidthExchanged,
                     "height and width exchanged")


def test_check_spatial_transformer_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_spatial_transformer, SpatialTransformerProjectedTwice, "5.4")


@pytest.mark.parametrize("cls, mistake", [
    (UNetSkipsOfALevelInPushOrder, "in the order they were pushed"),
    (UNetConcatenatesSkipFirst, "the up path's features first"),
    (UNetPopsTheFirstSkip, "takes the last one pushed"),   # crashes: the hint says why
])
def test_check_unet_forward_names_the_skip_mistake(cls, mistake):
    rejects_in_words(check_unet_forward, cls, "check_unet_forward failed", mistake)


class UNetOutputDoubled(MyUNet):
    def forward(self, latent, context, timestep):   # a mistake the check does not list
        return 2 * super().forward(latent, context, timestep)


def test_check_unet_forward_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_unet_forward, UNetOutputDoubled, "5.5")


def test_check_unet_forward_reports_the_crash_of_a_queue_of_skips():
    rejects(check_unet_forward, UNetPopsTheFirstSkip, "your code raised RuntimeError")


def test_pick_goes_on_with_the_reference_unet_when_the_forward_is_not_written(capsys):
    class Stub(sd.DiffusionUNET):
        def forward(self, latent, context, timestep):
            raise NotImplementedError("Exercise 5.5: push every output, pop on the way up")

    assert pick(check_unet_forward, Stub, reference=sd.DiffusionUNET) is sd.DiffusionUNET
    assert "not done yet: Exercise 5.5" in capsys.readouterr().out
