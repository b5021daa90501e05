"""The seed README's usage examples, as written, with SD v1.5 sizes as every constructor's default."""
import pytest
import torch

from sd import CLIP, DiffusionScheduler, DiffusionUNET, VAE_Decoder, VAE_Encoder


@pytest.mark.full_size
def test_seed_examples_run_as_written_with_sd15_defaults():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 128) * 2 - 1         # small pictures keep the full-size models quick on a CPU
    noise = torch.randn(1, 4, 8, 16)
    tokens = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        encoder = VAE_Encoder()
        latent = encoder(image, noise)
        assert latent.shape == (1, 4, 8, 16)

        decoder = VAE_Decoder()
        image = decoder(latent)
        assert image.shape == (1, 3, 64, 128)

        clip_model = CLIP()
        text_embedding = clip_model(tokens)
        assert text_embedding.shape == (1, 77, 768)

        unet = DiffusionUNET()
        predicted_noise = unet(latent, text_embedding, 981)
        assert predicted_noise.shape == latent.shape
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in clip_model.parameters()) == 123_060_480
    assert sum(p.numel() for m in (encoder, decoder) for p in m.parameters()) == 83_653_863


def test_seed_sampling_call_works_as_written():
    """`scheduler.sample(unet, context, shape=(1, 4, 64, 64))`: 50 DDIM steps; a stand-in noise predictor keeps it fast."""
    calls = []

    def unet(x, context, t):
        calls.append(int(t))
        return 0.1 * x + 0.01 * context.mean()
    context = torch.randn(1, 77, 768)
    scheduler = DiffusionScheduler()
    samples = scheduler.sample(unet, context, shape=(1, 4, 64, 64))
    assert samples.shape == (1, 4, 64, 64) and torch.isfinite(samples).all()
    assert calls == list(range(981, 0, -20))   # 50 steps, SD's leading spacing
