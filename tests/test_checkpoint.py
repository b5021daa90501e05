"""`sd.load_checkpoint` reads every SD v1.x layout and agrees with diffusers' own single-file conversion."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import sd
from tests.compvis_layout import compvis_checkpoint
from tests.reference import (diffusers_from_single_file, diffusers_unet, diffusers_vae, randomize,
                             reference_and_ours, rel_err, transformers_clip)

TOL = 1e-5


def assert_same_outputs(pipe, ref, latent_hw=(8, 8), context_dim=128, tol=TOL):
    h, w = latent_hw
    torch.manual_seed(1)
    x, ctx, tokens = torch.randn(1, 4, h, w), torch.randn(1, 77, context_dim), torch.randint(0, 49408, (1, 77))
    image, noise = torch.rand(1, 3, 8 * h, 8 * w) * 2 - 1, torch.randn(1, 4, h, w)
    with torch.no_grad():
        assert rel_err(pipe.unet(x, ctx, 777), ref["unet"](x, 777, encoder_hidden_states=ctx).sample) < tol
        assert rel_err(pipe.clip(tokens), ref["clip"](input_ids=tokens).last_hidden_state) < tol
        assert rel_err(pipe.decoder(x), ref["vae"].decode(x / 0.18215).sample) < 10 * tol
        post = ref["vae"].encode(image).latent_dist
        assert rel_err(pipe.encoder(image, noise), (post.mean + post.std * noise) * 0.18215) < 10 * tol


@pytest.fixture(scope="module")
def tiny():
    ref, _ = reference_and_ours(seed=3)
    return ref, compvis_checkpoint(ref)


def _configs():
    return sd.UNetConfig.tiny(), sd.VAEConfig.tiny(), sd.CLIPConfig.tiny()


def test_compvis_safetensors_matches_diffusers_single_file_conversion(tiny, tmp_path):
    _, ckpt = tiny
    path = tmp_path / "model.safetensors"
    save_file(ckpt, str(path))
    pipe = sd.load_checkpoint(path, device="cpu")
    # scaled-down widths are read off the tensor shapes
    assert pipe.unet.config.block_channels == (32, 64, 64, 64) and pipe.clip.config.width == 128
    assert_same_outputs(pipe, diffusers_from_single_file(ckpt, *_configs()))


def test_ckpt_with_state_dict_wrapper_ema_schedule_and_fp16(tiny, tmp_path):
    _, ckpt = tiny
    wrapped = {k: v.half() for k, v in ckpt.items()}
    wrapped["betas"] = torch.linspace(0.00085, 0.012, 1000)
    wrapped["alphas_cumprod"] = torch.rand(1000)
    wrapped.update({"model_ema." + k.replace("model.diffusion_model.", "diffusion_model").replace(".", ""): v
                    for k, v in list(ckpt.items())[:5]})
    wrapped["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": wrapped, "global_step": 470000}, path)
    pipe = sd.load_checkpoint(path, device="cpu")
    assert next(pipe.unet.parameters()).dtype == torch.float32
    half_values = {k: v.float() for k, v in wrapped.items() if k in ckpt}
    assert_same_outputs(pipe, diffusers_from_single_file(half_values, *_configs()))


def test_in_memory_state_dict_loads(tiny):
    ref, ckpt = tiny
    pipe = sd.load_checkpoint(dict(ckpt), device="cpu")
    assert_same_outputs(pipe, ref)


def test_diffusers_folder_loads(tiny, tmp_path):
    ref, _ = tiny
    ref["unet"].save_pretrained(tmp_path / "unet")
    ref["vae"].save_pretrained(tmp_path / "vae")
    ref["clip"].save_pretrained(tmp_path / "text_encoder")
    pipe = sd.load_checkpoint(tmp_path, device="cpu")
    assert pipe.unet.config.heads == 8
    assert_same_outputs(pipe, ref)


# --- bad checkpoints: a clear error, and nothing runs -------------------------------------------------------------

def test_checkpoint_with_a_removed_key_names_it(tiny):
    _, ckpt = tiny
    broken = dict(ckpt)
    del broken["model.diffusion_model.middle_block.1.proj_out.weight"]
    # named as the file spells it, not by this package's internal name (`mid.attn.proj_out.weight`)
    with pytest.raises(ValueError, match=r"^the state dict: UNet weights .*missing "
                                         r"`model\.diffusion_model\.middle_block\.1\.proj_out\.weight`$"):
        sd.load_checkpoint(broken, device="cpu")


def test_checkpoint_with_an_unexpected_key_names_it(tiny):
    _, ckpt = tiny
    broken = dict(ckpt)
    broken["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected `model\.diffusion_model\.input_blocks\.1\.1\.extra\.weight`$"):
        sd.load_checkpoint(broken, device="cpu")


def test_sd2_shaped_checkpoint_is_refused_by_name():
    unet_cfg = sd.UNetConfig(block_channels=(32, 64, 64, 64), context_dim=1024)
    ref = {"unet": randomize(diffusers_unet(unet_cfg)), "vae": randomize(diffusers_vae(sd.VAEConfig.tiny())),
           "clip": randomize(transformers_clip(sd.CLIPConfig.tiny()))}
    with pytest.raises(ValueError, match=r"SD 2\.x checkpoint.*only SD v1\.x is supported"):
        sd.load_checkpoint(compvis_checkpoint(ref), device="cpu")
    openclip = {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"SD 2\.x"):
        sd.load_checkpoint(openclip, device="cpu")


def test_sdxl_checkpoint_is_refused_by_name():
    with pytest.raises(ValueError, match=r"SDXL"):
        sd.load_checkpoint({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, device="cpu")


class RunsCode:
    """A pickle payload that would create a file if unpickling ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": RunsCode(marker)}}, f)
    with pytest.raises(ValueError, match=r"evil\.ckpt: this file holds Python objects beyond tensors.*"
                                         r"loading it would run code, refused"):
        sd.load_checkpoint(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("name,content", [("notes.safetensors", b"hello, not tensors"),
                                          ("notes.ckpt", b"hello, not a pickle"),
                                          ("notes.txt", b"hello")])
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        sd.load_checkpoint(path, device="cpu")


def test_missing_file_and_no_source_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sd.load_checkpoint(tmp_path / "absent.safetensors", device="cpu")


@pytest.mark.full_size
def test_full_size_sd15_file_matches_diffusers_single_file_conversion(tmp_path):
    """A full-size SD v1.5-layout file (random values, fp16 on disk): same outputs as diffusers' conversion."""
    from safetensors.torch import load_file
    unet_cfg, vae_cfg, clip_cfg = sd.UNetConfig(), sd.VAEConfig(), sd.CLIPConfig()
    ref = {"unet": randomize(diffusers_unet(unet_cfg), 10), "vae": randomize(diffusers_vae(vae_cfg), 11),
           "clip": randomize(transformers_clip(clip_cfg), 12)}
    path = tmp_path / "v1-5-random.safetensors"
    ckpt = {k: v.half() for k, v in compvis_checkpoint(ref).items()}
    # the real file's key counts (SD_FACTS): 686 UNet, 248 VAE, 197 CLIP (with position_ids)
    assert sum(k.startswith("model.diffusion_model.") for k in ckpt) == 686
    assert sum(k.startswith("first_stage_model.") for k in ckpt) == 248
    assert sum(k.startswith("cond_stage_model.") for k in ckpt) == 197
    save_file(ckpt, str(path))
    del ref, ckpt
    pipe = sd.load_checkpoint(path, device="cpu")
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    ref = diffusers_from_single_file({k: v.float() for k, v in load_file(str(path)).items()},
                                     unet_cfg, vae_cfg, clip_cfg)
    assert_same_outputs(pipe, ref, latent_hw=(8, 8), context_dim=768)
