"""sd.course: which model the notebooks get, in order ($SD_CHECKPOINT, SD v1.5 from the Hub, the shipped small
model), and the untrained stand-in when there is none."""
import torch

import sd
import sd.io.checkpoint
from sd.io.checkpoint import save_checkpoint
from sd.course.models import CHECKPOINT_ENV, SD15_REPO, load_course_model, untrained_model


def test_environment_variable_checkpoint_comes_first(tmp_path, monkeypatch, offline_hub, capsys):
    torch.manual_seed(3)
    unet = sd.DiffusionUNET(sd.UNetConfig.tiny())
    path = save_checkpoint(tmp_path / "mine.safetensors", sd.CLIP(sd.CLIPConfig.tiny()),
                           sd.VAE_Encoder(sd.VAEConfig.tiny()), sd.VAE_Decoder(sd.VAEConfig.tiny()), unet)
    monkeypatch.setenv(CHECKPOINT_ENV, str(path))
    pipe = load_course_model("cpu", allow_download=True)
    assert str(path) in capsys.readouterr().out
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)
    assert pipe.dtype == torch.float32


def test_unreachable_hub_falls_back_to_the_shipped_model_with_a_message(offline_hub, capsys):
    pipe = load_course_model("cpu", allow_download=True)
    said = capsys.readouterr().out
    assert "SD v1.5 is not reachable" in said and SD15_REPO in said and "small model" in said
    shipped = sd.load_checkpoint(device="cpu")
    assert torch.equal(pipe.unet.conv_in.weight, shipped.unet.conv_in.weight)


def test_no_model_at_all_returns_none(offline_hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sd.io.checkpoint, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    assert load_course_model("cpu") is None
    assert "No trained model is available" in capsys.readouterr().out


def test_untrained_stand_in_has_the_small_models_sizes_and_is_seeded():
    a, b = untrained_model("cpu"), untrained_model("cpu")
    assert a.native_size == 32
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert not torch.equal(a.unet.conv_in.weight, untrained_model("cpu", seed=1).unet.conv_in.weight)
    images = a.generate("a red circle", num_inference_steps=2, seed=0, output_type="pt", progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
