"""The `sd` models give the same numbers as diffusers/transformers when they hold the same weights."""
import pytest
import torch

import sd
from tests.reference import reference_and_ours, rel_err

TOL_CLIP_UNET = 1e-5   # relative to the output scale (float32 noise from a different op order is ~2e-6)
TOL_VAE = 1e-4


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return reference_and_ours()


@pytest.mark.parametrize("t", [0, 1, 250, 500, 999])
def test_unet_matches_diffusers_at_every_timestep(models, t):
    ref, ours = models
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    with torch.no_grad():
        expected = ref["unet"](x, t, encoder_hidden_states=ctx).sample
        got = ours["unet"](x, ctx, t)
    assert got.shape == x.shape
    assert rel_err(got, expected) < TOL_CLIP_UNET


def test_unet_takes_a_batch_of_different_timesteps(models):
    ref, ours = models
    x, ctx, t = torch.randn(3, 4, 8, 16), torch.randn(3, 77, 128), torch.tensor([3, 400, 999])
    with torch.no_grad():
        expected = ref["unet"](x, t, encoder_hidden_states=ctx).sample
        got = ours["unet"](x, ctx, t)
        got_0d = ours["unet"](x[:1], ctx[:1], torch.tensor(400))
    assert rel_err(got, expected) < TOL_CLIP_UNET
    assert rel_err(got_0d, ref["unet"](x[:1], 400, encoder_hidden_states=ctx[:1]).sample.detach()) < TOL_CLIP_UNET


def test_clip_matches_transformers(models):
    ref, ours = models
    tokens = torch.randint(0, 49408, (2, 77))
    tokens[:, 0] = 49406
    with torch.no_grad():
        expected = ref["clip"](input_ids=tokens).last_hidden_state
        got = ours["clip"](tokens)
    assert got.shape == (2, 77, 128)
    assert rel_err(got, expected) < TOL_CLIP_UNET


def test_clip_is_causal(models):
    """Changing a later token must not change earlier outputs (the causal mask)."""
    _, ours = models
    tokens = torch.randint(0, 49408, (1, 77))
    changed = tokens.clone()
    changed[0, 40:] = 7
    with torch.no_grad():
        a, b = ours["clip"](tokens), ours["clip"](changed)
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6)
    assert not torch.allclose(a[:, 40:], b[:, 40:], atol=1e-3)


def test_vae_encoder_matches_diffusers_with_the_same_noise(models):
    ref, ours = models
    image, noise = torch.rand(2, 3, 64, 48) * 2 - 1, torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        posterior = ref["vae"].encode(image).latent_dist
        expected = (posterior.mean + posterior.std * noise) * 0.18215
        got = ours["encoder"](image, noise)
        got_mean = ours["encoder"](image)
    assert got.shape == (2, 4, 8, 6)
    assert rel_err(got, expected) < TOL_VAE
    assert rel_err(got_mean, posterior.mean * 0.18215) < TOL_VAE


def test_vae_decoder_matches_diffusers(models):
    ref, ours = models
    latent = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        expected = ref["vae"].decode(latent / 0.18215).sample
        got = ours["decoder"](latent)
    assert got.shape == (2, 3, 64, 48)
    assert rel_err(got, expected) < TOL_VAE


# --- per block ---------------------------------------------------------------------------------------------------

def test_unet_residual_block_matches(models):
    ref, ours = models
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    with torch.no_grad():
        expected = ref["unet"].down_blocks[1].resnets[0](x, emb)
        got = ours["unet"].down[1].res[0](x, emb)
    assert rel_err(got, expected) < TOL_CLIP_UNET


@pytest.mark.parametrize("scale", [1.0, 1e-3])   # a low-variance input makes the GroupNorm epsilon (1e-6) visible
def test_unet_spatial_transformer_matches(models, scale):
    ref, ours = models
    x, ctx = torch.randn(2, 64, 4, 4) * scale, torch.randn(2, 77, 128)
    with torch.no_grad():
        expected = ref["unet"].down_blocks[1].attentions[0](x, encoder_hidden_states=ctx).sample
        got = ours["unet"].down[1].attn[0](x, ctx)
    assert rel_err(got - x, expected - x) < TOL_CLIP_UNET


def test_unet_transformer_block_matches(models):
    ref, ours = models
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 77, 128)
    with torch.no_grad():
        expected = ref["unet"].down_blocks[1].attentions[0].transformer_blocks[0](x, encoder_hidden_states=ctx)
        got = ours["unet"].down[1].attn[0].blocks[0](x, ctx)
    assert rel_err(got, expected) < TOL_CLIP_UNET


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_vae_residual_and_attention_blocks_match(models, scale):
    ref, ours = models
    x = torch.randn(1, 64, 8, 8) * scale
    with torch.no_grad():
        assert rel_err(ours["encoder"].mid.res1(x), ref["vae"].encoder.mid_block.resnets[0](x, None)) < TOL_VAE
        expected = ref["vae"].encoder.mid_block.attentions[0](x)
        got = ours["encoder"].mid.attn(x)
    assert rel_err(got - x, expected - x) < TOL_VAE


def test_clip_layer_matches(models):
    ref, ours = models
    x = torch.randn(2, 77, 128)
    mask = torch.full((77, 77), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = getattr(ref["clip"], "text_model", ref["clip"]).encoder.layers[0](x, mask)
        expected = out[0] if isinstance(out, tuple) else out
        got = ours["clip"].layers[0](x)
    assert rel_err(got, expected) < TOL_CLIP_UNET


def test_explicit_attention_equals_sdpa(models, monkeypatch):
    _, ours = models
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 128)
    tokens = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        fused = ours["unet"](x, ctx, 500), ours["clip"](tokens), ours["decoder"](x)
        monkeypatch.setattr(sd.attention, "USE_SDPA", False)
        explicit = ours["unet"](x, ctx, 500), ours["clip"](tokens), ours["decoder"](x)
    for a, b in zip(fused, explicit):
        assert rel_err(b, a) < 1e-5


# --- the tests can fail: each SD detail, broken on purpose, breaks parity ------------------------------------------

def _set_eps(module, eps):
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = eps


def test_parity_fails_with_the_wrong_groupnorm_epsilon(models):
    ref, ours = models
    x, ctx = torch.randn(2, 64, 4, 4) * 1e-3, torch.randn(2, 77, 128)
    block = ours["unet"].down[1].attn[0]
    with torch.no_grad():
        expected = ref["unet"].down_blocks[1].attentions[0](x, encoder_hidden_states=ctx).sample
        _set_eps(block, 1e-5)
        try:
            wrong = block(x, ctx)
        finally:
            _set_eps(block, 1e-6)
    assert rel_err(wrong - x, expected - x) > 100 * TOL_CLIP_UNET


def test_parity_fails_with_sin_cos_swapped(models, monkeypatch):
    ref, ours = models
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    original = sd.unet.timestep_embedding

    def swapped(t, dim):
        e = original(t, dim)
        return torch.cat([e[:, dim // 2:], e[:, :dim // 2]], dim=1)
    monkeypatch.setattr(sd.unet, "timestep_embedding", swapped)
    with torch.no_grad():
        expected = ref["unet"](x, 500, encoder_hidden_states=ctx).sample
        wrong = ours["unet"](x, ctx, 500)
    assert rel_err(wrong, expected) > 100 * TOL_CLIP_UNET
