"""Half precision stays within half-precision noise of float32, and the decoded image never has NaNs.

On CPU this runs in bfloat16 (what CPUs compute in half precision), tiny and at full SD v1.5 size; on a CUDA
machine also in float16.
"""
import pytest
import torch
import torch.nn.functional as F

import sd
from tests.reference import randomize

CASES = [("cpu", torch.bfloat16, "tiny"),
         pytest.param("cpu", torch.bfloat16, "full", marks=pytest.mark.full_size)]   # SD v1.5 sizes, ~30 s
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16, "tiny"), ("cuda", torch.float16, "full"), ("cuda", torch.bfloat16, "full")]


def random_model(cls, config):
    """The model with random weights, built without its own initialisation (randomize sets every parameter, and
    these models hold no buffers): at SD v1.5's size the default init alone takes tens of seconds."""
    with torch.device("meta"):
        model = cls(config)
    assert not list(model.buffers()), "to_empty would leave a buffer uninitialised"
    return randomize(model.to_empty(device="cpu"))


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("device,dtype,size", CASES)
def test_models_in_half_precision_match_float32(device, dtype, size):
    torch.manual_seed(0)
    tiny = size == "tiny"
    models = {
        "unet": random_model(sd.DiffusionUNET, sd.UNetConfig.tiny() if tiny else sd.UNetConfig()),
        "clip": random_model(sd.CLIP, sd.CLIPConfig.tiny() if tiny else sd.CLIPConfig()),
        "decoder": random_model(sd.VAE_Decoder, sd.VAEConfig.tiny() if tiny else sd.VAEConfig()),
    }
    d = models["unet"].config.context_dim
    # full widths on one 8 x 8 latent for the UNet, 4 x 4 for the decoder (32 x 32 pixels): bfloat16 convolutions
    # are very slow on CPUs without bfloat16 instructions (the decoder on 8 x 8 takes minutes), and the widths,
    # not the picture size, are what half precision stresses
    batch, side = (2, 32) if tiny else (1, 8)
    x, ctx = torch.randn(batch, 4, side, side, device=device), torch.randn(batch, 77, d, device=device)
    tokens = torch.randint(0, 49408, (2, 77), device=device)
    inputs = {"unet": (x, ctx, 500), "clip": (tokens,), "decoder": (x[:1, :, :4, :4],)}
    for name, model in models.items():
        model.to(device).eval()
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs[name]]
        with torch.no_grad():
            expected = model(*inputs[name])          # float32 first, then the same weights rounded to dtype
            got = model.to(dtype)(*args)
        assert torch.isfinite(got).all(), f"{name} in {dtype} produced NaN/inf"
        assert cosine(got, expected) >= 0.999, f"{name} in {dtype}: cosine {cosine(got, expected):.5f}"


def test_pipeline_decodes_in_float32_even_when_the_rest_is_half(tmp_path):
    from sd.io.checkpoint import save_checkpoint
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "m.safetensors", sd.CLIP(sd.CLIPConfig.tiny()),
                           sd.VAE_Encoder(sd.VAEConfig.tiny()), sd.VAE_Decoder(sd.VAEConfig.tiny()),
                           sd.DiffusionUNET(sd.UNetConfig.tiny()))
    pipe = sd.load_checkpoint(path, device="cpu", dtype=torch.bfloat16)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.decoder.parameters()).dtype == torch.float32
    images = pipe.generate("a cat", height=64, width=64, num_inference_steps=2, seed=0, output_type="pt",
                           progress=False)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
