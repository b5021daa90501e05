"""The exercise checks of notebook 02 (VAE): the reference passes, plausible wrong implementations are named.

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
from sd.course.checks import (check_latent_scale, check_reparameterize, check_vae_attention_block, check_vae_decoder,
                              check_vae_encoder, check_vae_residual_block, pick)
from sd.course.checks.vae import measure_latent_scale
from sd.layers import Upsample
from sd.vae_blocks import VAE_AttentionBlock, VAE_Downsample, VAE_ResidualBlock
from sd.training.vae import latent_scale
from tests.check_helpers import program_text, rejects, rejects_unrecognised


# ---------------------------------------------------------------------------------------------------------
# Residual blocks, as a learner might write them
# ---------------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """A correct block written differently from sd's: activation modules, the skip computed first."""

    def __init__(self, in_channels, out_channels, groups=32, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = nn.SiLU()
        if in_channels == out_channels:
            self.conv_shortcut = None
        else:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + skip


class ResidualBlockDefaultEps(ResidualBlock):
    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__(in_channels, out_channels, groups, eps=1e-5)


class ResidualBlockNoSkip(ResidualBlock):
    def forward(self, x):
        return self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))


class ResidualBlockReLU(ResidualBlock):
    def forward(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class ResidualBlockShortcutNeverBuilt(nn.Module):
    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class ResidualBlockShortcutNotUsed(ResidualBlock):
    def forward(self, x):
        return x + self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))


class ResidualBlockShortcutAlways(ResidualBlock):
    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__(in_channels, out_channels, groups)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)


class ResidualBlockConvFirst(ResidualBlock):
    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__(in_channels, out_channels, groups)
        self.norm1 = nn.GroupNorm(groups, out_channels, eps=1e-6)

    def forward(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.act(self.norm1(self.conv1(x)))
        return skip + self.act(self.norm2(self.conv2(h)))


def test_vae_checks_pass_the_reference_with_one_line_each(capsys):
    assert check_vae_residual_block(VAE_ResidualBlock) is True
    assert check_vae_attention_block(VAE_AttentionBlock) is True
    assert check_reparameterize(sd.course.checks.vae.reparameterize) is True
    assert check_vae_encoder(sd.VAE_Encoder) is True
    assert check_vae_decoder(sd.VAE_Decoder) is True
    assert check_latent_scale(measure_latent_scale) is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


def test_check_vae_residual_block_passes_a_correct_block_written_differently():
    assert check_vae_residual_block(ResidualBlock)


@pytest.mark.parametrize("cls, mistake", [
    (ResidualBlockDefaultEps, "epsilon is PyTorch's default 1e-5"),
    (ResidualBlockNoSkip, "skip connection is missing"),
    (ResidualBlockReLU, "activation is ReLU"),
    (ResidualBlockConvFirst, "conv, norm, SiLU"),
    (ResidualBlockShortcutNeverBuilt, "conv_shortcut is missing"),
    (ResidualBlockShortcutNotUsed, "pass the input through conv_shortcut"),
    (ResidualBlockShortcutAlways, "conv_shortcut exists although the widths are equal"),
])
def test_check_vae_residual_block_names_the_mistake(cls, mistake):
    rejects(check_vae_residual_block, cls, "check_vae_residual_block failed", mistake)


# ---------------------------------------------------------------------------------------------------------
# Attention blocks
# ---------------------------------------------------------------------------------------------------------

class AttentionBlock(nn.Module):
    """The exercise's constructor with a correct forward written with the fused kernel."""

    def __init__(self, channels, groups=32, eps=1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def tokens(self, x):
        b, c, h, w = x.shape
        return self.group_norm(x).flatten(2).transpose(1, 2)   # (B, H*W, C)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.tokens(x)
        out = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class AttentionBlockNoResidual(AttentionBlock):
    def forward(self, x):
        return super().forward(x) - x


class AttentionBlockReshapedWrong(AttentionBlock):
    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        out = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out(out).reshape(b, c, h, w)


class AttentionBlockScaledByC(AttentionBlock):
    def forward(self, x):
        b, c, h, w = x.shape
        t = self.tokens(x)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        out = torch.softmax(q @ k.transpose(1, 2) / c, dim=-1) @ v
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class AttentionBlockDefaultEps(AttentionBlock):
    def __init__(self, channels, groups=32):
        super().__init__(channels, groups, eps=1e-5)


class AttentionBlockNoNorm(AttentionBlock):
    def tokens(self, x):
        return x.flatten(2).transpose(1, 2)


def test_check_vae_attention_block_passes_a_correct_block_with_the_fused_kernel():
    assert check_vae_attention_block(AttentionBlock)


@pytest.mark.parametrize("cls, mistake", [
    (AttentionBlockNoResidual, "residual connection is missing"),
    (AttentionBlockReshapedWrong, "pixels are made tokens the wrong way"),
    (AttentionBlockScaledByC, "divided by C"),
    (AttentionBlockDefaultEps, "epsilon is 1e-5"),
    (AttentionBlockNoNorm, "GroupNorm is skipped"),
])
def test_check_vae_attention_block_names_the_mistake(cls, mistake):
    rejects(check_vae_attention_block, cls, "check_vae_attention_block failed", mistake)


# ---------------------------------------------------------------------------------------------------------
# Reparameterization
# ---------------------------------------------------------------------------------------------------------

def sample(mean, logvar, noise, scale=0.18215):
    if noise is None:
        return scale * mean
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return scale * (mean + std * noise)


def sample_unscaled(mean, logvar, noise, scale=0.18215):
    return mean if noise is None else mean + torch.exp(logvar.clamp(-30, 20) / 2) * noise


def sample_logvar_as_std(mean, logvar, noise, scale=0.18215):
    return scale * mean if noise is None else scale * (mean + logvar.clamp(-30, 20) * noise)


def sample_variance_as_std(mean, logvar, noise, scale=0.18215):
    return scale * mean if noise is None else scale * (mean + logvar.clamp(-30, 20).exp() * noise)


def sample_unclamped(mean, logvar, noise, scale=0.18215):
    return scale * mean if noise is None else scale * (mean + torch.exp(logvar / 2) * noise)


def sample_fixed_scale(mean, logvar, noise, scale=0.18215):
    return sample(mean, logvar, noise, 0.18215)


def test_check_reparameterize_passes_a_correct_sampler_written_differently():
    assert check_reparameterize(sample)


@pytest.mark.parametrize("fn, mistake", [
    (sample_unscaled, "latent is not scaled"),
    (sample_logvar_as_std, "log-variance is used as the standard deviation"),
    (sample_variance_as_std, "is the variance, not the standard deviation"),
    (sample_unclamped, "not clamped"),
    (sample_fixed_scale, "scale argument is ignored"),
])
def test_check_reparameterize_names_the_mistake(fn, mistake):
    rejects(check_reparameterize, fn, "check_reparameterize failed", mistake)


# ---------------------------------------------------------------------------------------------------------
# Downsampling
# ---------------------------------------------------------------------------------------------------------

class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), value=0.0))


class DownsampleSymmetric(Downsample):
    def forward(self, x):
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1)


class DownsamplePadsLeftTop(Downsample):
    def forward(self, x):
        return self.conv(F.pad(x, (1, 0, 1, 0)))


class DownsampleNoPadding(Downsample):
    def forward(self, x):
        return self.conv(x)


def test_downsample_padding_on_the_left_gives_the_same_shape_and_other_numbers():
    """Why the encoder check names symmetric padding: nothing crashes, only the numbers move."""
    torch.manual_seed(0)
    right, left = Downsample(4), DownsampleSymmetric(4)
    left.load_state_dict(right.state_dict())
    x = torch.randn(1, 4, 8, 8)
    assert right(x).shape == left(x).shape == (1, 4, 4, 4)
    assert (right(x) - left(x)).abs().max() > 0.1
    reference = VAE_Downsample(4)
    reference.load_state_dict(right.state_dict())
    torch.testing.assert_close(reference(x), right(x))   # sd pads the right and the bottom


# ---------------------------------------------------------------------------------------------------------
# Encoder and decoder, assembled as in the notebook
# ---------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """The notebook's encoder: sd's blocks in plain containers, forward written out."""

    def __init__(self, config=None, downsample=VAE_Downsample):
        super().__init__()
        self.config = config = config or sd.VAEConfig()
        ch, groups = config.block_channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(ch):
            level = nn.Module()
            level.res = nn.ModuleList(VAE_ResidualBlock(ch[max(i - 1, 0)] if j == 0 else width, width, groups)
                                      for j in range(config.layers_per_block))
            level.downsample = downsample(width) if i < len(ch) - 1 else None
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.res1 = VAE_ResidualBlock(ch[-1], ch[-1], groups)
        self.mid.attn = VAE_AttentionBlock(ch[-1], groups)
        self.mid.res2 = VAE_ResidualBlock(ch[-1], ch[-1], groups)
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def features(self, image, attention=True):
        x = self.conv_in(image)
        for level in self.down:
            for block in level.res:
                x = block(x)
            if level.downsample is not None:
                x = level.downsample(x)
        x = self.mid.res1(x)
        if attention:
            x = self.mid.attn(x)
        return self.mid.res2(x)

    def forward(self, image, noise=None):
        x = self.quant_conv(self.conv_out(F.silu(self.norm_out(self.features(image)))))
        mean, logvar = torch.chunk(x, 2, dim=1)
        return sample(mean, logvar, noise, self.config.scaling_factor)


class EncoderSymmetricDownsampling(Encoder):
    def __init__(self, config=None):
        super().__init__(config, downsample=DownsampleSymmetric)


class EncoderUnscaled(Encoder):
    def forward(self, image, noise=None):
        mean, logvar = self.quant_conv(self.conv_out(F.silu(self.norm_out(self.features(image))))).chunk(2, 1)
        return sample_unscaled(mean, logvar, noise)


class EncoderWithoutAttention(Encoder):
    def forward(self, image, noise=None):
        x = self.quant_conv(self.conv_out(F.silu(self.norm_out(self.features(image, attention=False)))))
        mean, logvar = x.chunk(2, dim=1)
        return sample(mean, logvar, noise, self.config.scaling_factor)


class EncoderFixedScale(Encoder):
    def forward(self, image, noise=None):
        mean, logvar = self.quant_conv(self.conv_out(F.silu(self.norm_out(self.features(image))))).chunk(2, 1)
        return sample(mean, logvar, noise)


def test_check_vae_encoder_passes_the_notebooks_assembly():
    assert check_vae_encoder(Encoder)


@pytest.mark.parametrize("cls, mistake", [
    (EncoderSymmetricDownsampling, "pads the left and the top (symmetric padding"),
    (EncoderUnscaled, "latent is not scaled"),
    (EncoderWithoutAttention, "attention is skipped"),
    (EncoderFixedScale, "0.18215 whatever the config"),
])
def test_check_vae_encoder_names_the_mistake(cls, mistake):
    rejects(check_vae_encoder, cls, "check_vae_encoder failed", mistake)


class Decoder(nn.Module):
    """The notebook's decoder: sd's blocks in plain containers, forward written out."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or sd.VAEConfig()
        ch, groups = tuple(reversed(config.block_channels)), config.norm_groups
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid = nn.Module()
        self.mid.res1 = VAE_ResidualBlock(ch[0], ch[0], groups)
        self.mid.attn = VAE_AttentionBlock(ch[0], groups)
        self.mid.res2 = VAE_ResidualBlock(ch[0], ch[0], groups)
        self.up = nn.ModuleList()
        for i, width in enumerate(ch):
            level = nn.Module()
            level.res = nn.ModuleList(VAE_ResidualBlock(ch[max(i - 1, 0)] if j == 0 else width, width, groups)
                                      for j in range(config.layers_per_block + 1))
            level.upsample = Upsample(width) if i < len(ch) - 1 else None
            self.up.append(level)
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], config.in_channels, 3, padding=1)

    def body(self, x):
        x = self.conv_in(x)
        x = self.mid.res2(self.mid.attn(self.mid.res1(x)))
        for level in self.up:
            for block in level.res:
                x = block(x)
            if level.upsample is not None:
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    def forward(self, latent):
        return self.body(self.post_quant_conv(latent / self.config.scaling_factor))


class DecoderNotUnscaled(Decoder):
    def forward(self, latent):
        return self.body(self.post_quant_conv(latent))


class DecoderMultiplies(Decoder):
    def forward(self, latent):
        return self.body(self.post_quant_conv(latent * self.config.scaling_factor))


class DecoderWithoutPostQuant(Decoder):
    def forward(self, latent):
        return self.body(latent / self.config.scaling_factor)


def test_check_vae_decoder_passes_the_notebooks_assembly():
    assert check_vae_decoder(Decoder)


@pytest.mark.parametrize("cls, mistake", [
    (DecoderNotUnscaled, "not divided by the scale"),
    (DecoderMultiplies, "multiplied by the scale"),
    (DecoderWithoutPostQuant, "post_quant_conv is skipped"),
])
def test_check_vae_decoder_names_the_mistake(cls, mistake):
    rejects(check_vae_decoder, cls, "check_vae_decoder failed", mistake)


def test_pick_goes_on_with_the_reference_when_the_block_is_wrong(capsys):
    assert pick(check_vae_residual_block, ResidualBlockNoSkip, reference=VAE_ResidualBlock) is VAE_ResidualBlock
    out = capsys.readouterr().out
    assert "❌ check_vae_residual_block failed" in out and "using the reference sd.vae_blocks.VAE_ResidualBlock" in out


def test_the_reference_sampler_is_the_encoders_own():
    """The check's reference function gives what sd.VAE_Encoder.forward returns for the same noise."""
    torch.manual_seed(0)
    encoder = sd.VAE_Encoder(sd.VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)).eval()
    image, noise = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        mean, logvar = encoder.posterior(image)
        expected = encoder(image, noise)
    torch.testing.assert_close(sd.course.checks.vae.reparameterize(mean, logvar, noise), expected)
    torch.testing.assert_close(sample(mean, logvar, noise), expected)
    assert math.isclose(encoder.config.scaling_factor, 0.18215)


# ---------------------------------------------------------------------------------------------------------
# Unknown mistakes point to the hints, in words
# ---------------------------------------------------------------------------------------------------------

class ResidualBlockSkipTwice(ResidualBlock):
    def forward(self, x):
        return 2 * super().forward(x) - self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))


class AttentionBlockHalfResidual(AttentionBlock):
    def forward(self, x):
        return 0.5 * (x + super().forward(x))


def sample_noise_doubled(mean, logvar, noise, scale=0.18215):
    return sample(mean, logvar, None if noise is None else 2 * noise, scale)


class EncoderReluOut(Encoder):
    def forward(self, image, noise=None):
        x = self.quant_conv(self.conv_out(F.relu(self.norm_out(self.features(image)))))
        mean, logvar = x.chunk(2, dim=1)
        return sample(mean, logvar, noise, self.config.scaling_factor)


class DecoderWithoutSecondMidBlock(Decoder):
    def body(self, x):
        x = self.mid.attn(self.mid.res1(self.conv_in(x)))
        for level in self.up:
            for block in level.res:
                x = block(x)
            if level.upsample is not None:
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def test_vae_checks_point_to_the_hints_on_an_unknown_mistake():
    rejects_unrecognised(check_vae_residual_block, ResidualBlockSkipTwice, "2.1")
    rejects_unrecognised(check_vae_attention_block, AttentionBlockHalfResidual, "2.2")
    rejects_unrecognised(check_reparameterize, sample_noise_doubled, "2.3")
    rejects_unrecognised(check_vae_encoder, EncoderReluOut, "2.4")
    rejects_unrecognised(check_vae_decoder, DecoderWithoutSecondMidBlock, "2.5")


@pytest.mark.parametrize("check, impl", [
    (check_vae_residual_block, ResidualBlockShortcutNeverBuilt),
    (check_vae_residual_block, ResidualBlockShortcutNotUsed),
    (check_vae_residual_block, ResidualBlockDefaultEps),
    (check_vae_attention_block, AttentionBlockReshapedWrong),
    (check_reparameterize, sample_variance_as_std),
    (check_reparameterize, sample_unclamped),
    (check_vae_encoder, EncoderSymmetricDownsampling),
    (check_vae_decoder, DecoderNotUnscaled),
])
def test_named_vae_mistakes_are_said_in_words_not_code(check, impl):
    message = rejects(check, impl, "Hint: ")
    assert program_text(message) is None, message


# ---------------------------------------------------------------------------------------------------------
# Measuring the latent scale
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def scale_of(encoder, images, batch_size):
    """A correct measurement written differently: unscaled means gathered in a list, std of the whole."""
    latents = []
    for start in range(0, len(images), batch_size):
        latents.append(encoder(images[start:start + batch_size]) / encoder.config.scaling_factor)
    return float(1 / torch.cat(latents).std())


@torch.no_grad()
def scale_not_unscaled(encoder, images, batch_size):
    return 1 / torch.cat([encoder(b) for b in images.split(batch_size)]).std().item()


@torch.no_grad()
def scale_returns_sigma(encoder, images, batch_size):
    return 1 / scale_of(encoder, images, batch_size)


@torch.no_grad()
def scale_per_batch(encoder, images, batch_size):
    stds = [(encoder(b) / encoder.config.scaling_factor).std().item() for b in images.split(batch_size)]
    return 1 / (sum(stds) / len(stds))


@torch.no_grad()
def scale_per_batch_inverted_first(encoder, images, batch_size):
    return sum(1 / (encoder(b) / encoder.config.scaling_factor).std().item()
               for b in images.split(batch_size)) / len(images.split(batch_size))


@torch.no_grad()
def scale_first_batch(encoder, images, batch_size):
    return 1 / (encoder(images[:batch_size]) / encoder.config.scaling_factor).std().item()


@torch.no_grad()
def scale_rms(encoder, images, batch_size):
    z = torch.cat([encoder(b) for b in images.split(batch_size)]) / encoder.config.scaling_factor
    return 1 / z.square().mean().sqrt().item()


@torch.no_grad()
def scale_all_at_once(encoder, images, batch_size):
    return 1 / (encoder(images) / encoder.config.scaling_factor).std().item()


@torch.no_grad()
def scale_of_samples(encoder, images, batch_size):
    z = torch.cat([encoder(b, torch.randn_like(encoder(b))) for b in images.split(batch_size)])
    return 1 / (z / encoder.config.scaling_factor).std().item()


@torch.no_grad()
def scale_one_over_variance(encoder, images, batch_size):
    return scale_of(encoder, images, batch_size) ** 2


def test_the_reference_measurement_is_the_training_codes():
    """measure_latent_scale gives what sd.training.vae.latent_scale sets as the small model's factor."""
    torch.manual_seed(0)
    encoder = sd.VAE_Encoder(sd.VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4,
                                          scaling_factor=0.3)).eval()
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    assert math.isclose(measure_latent_scale(encoder, images, batch_size=4), latent_scale(encoder, images),
                        rel_tol=1e-5)


def test_check_latent_scale_passes_a_measurement_written_differently(capsys):
    assert check_latent_scale(scale_of) is True
    assert capsys.readouterr().out.startswith("✅ check_latent_scale passed")


@pytest.mark.parametrize("fn, mistake", [
    (scale_not_unscaled, "not unscaled"),
    (scale_returns_sigma, "its inverse"),
    (scale_per_batch, "batches were averaged"),
    (scale_per_batch_inverted_first, "scales of the batches were averaged"),
    (scale_first_batch, "only the first batch"),
    (scale_rms, "root mean square"),
    (scale_all_at_once, "images at once"),
    (scale_of_samples, "given noise"),
])
def test_check_latent_scale_names_the_mistake(fn, mistake):
    message = rejects(check_latent_scale, fn, "check_latent_scale failed", mistake)
    assert program_text(message) is None, message


def test_check_latent_scale_wants_a_number():
    rejects(check_latent_scale, lambda encoder, images, batch_size: [0.5], "should be a number")


def test_check_latent_scale_points_to_the_hints_on_an_unknown_mistake():
    message = rejects_unrecognised(check_latent_scale, scale_one_over_variance, "2.6")
    assert "your scale is" in message
