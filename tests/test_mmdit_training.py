"""The transformer end to end: `train mmdit` runs, resumes exactly and writes a model that `load_checkpoint`,
`generate` and the CLI take; the flow sampler lands on the data; features built on SD's UNet refuse it in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

import sd
from sd.flow_scheduler import FlowScheduler
from sd.io.checkpoint import DEFAULT_MODEL, TRANSFORMER_MODEL
from sd.io.safe_read import save_safetensors
from sd.mmdit import MMDiT, TIME_SCALE
from sd.training import TrainOptions, read_stage, train_stage
from sd.training.data import ShapesDataset
from sd.training.mmdit import flow_loss

IMAGE_SIZE = 16      # the shipped VAE shrinks 4x: 4 x 4 latents


def _opts(out, **kw):
    base = dict(out_dir=str(out), steps=3, batch_size=8, seed=0, progress=False, checkpoint_every=2, device="cpu")
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(32, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("mmdit")
    run = train_stage("mmdit", _opts(out), "tiny", dataset, IMAGE_SIZE, base=DEFAULT_MODEL)
    return out, run


def test_the_stage_trains_on_the_frozen_base_and_writes_a_loadable_model(trained):
    out, run = trained
    parts, meta = read_stage(out / "mmdit.safetensors")
    assert meta["step"] == 3 and all(torch.isfinite(torch.tensor(meta["losses"])))
    assert parts["ema"] and parts["optim"]
    model = sd.load_checkpoint(out / "model.safetensors", device="cpu")
    assert isinstance(model.unet, MMDiT) and model.is_flow and model.default_sampler == "euler"
    base = sd.load_checkpoint(DEFAULT_MODEL, device="cpu")
    for name in ("clip", "encoder", "decoder"):       # the base's parts, unchanged by training
        for (k, a), b in zip(getattr(model, name).state_dict().items(), getattr(base, name).state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}.{k}")
    images = model.generate("a red circle on a blue background", num_inference_steps=2, seed=0, progress=False,
                            output_type="pt")
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path, dataset):
    train_stage("mmdit", _opts(tmp_path / "a", steps=4), "tiny", dataset, IMAGE_SIZE, base=DEFAULT_MODEL)
    train_stage("mmdit", _opts(tmp_path / "b", steps=2), "tiny", dataset, IMAGE_SIZE, base=DEFAULT_MODEL)
    train_stage("mmdit", _opts(tmp_path / "b", steps=4, resume=True), "tiny", dataset, IMAGE_SIZE, base=DEFAULT_MODEL)
    a, meta_a = read_stage(tmp_path / "a" / "mmdit.safetensors")
    b, meta_b = read_stage(tmp_path / "b" / "mmdit.safetensors")
    assert meta_b["step"] == 4 and meta_b["losses"] == pytest.approx(meta_a["losses"], rel=1e-5)
    for group in ("model", "ema"):
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=1e-5, atol=1e-6, msg=f"{group}.{k}")


def test_the_flow_loss_is_zero_for_a_model_that_knows_the_velocity():
    """A stand-in that reads the noise off x_t = (1 - t) z0 + t eps (it knows z0) predicts eps - z0 exactly."""
    z0 = torch.randn(4, 4, 2, 2)

    def oracle(x_t, context, timestep):
        t = (timestep / TIME_SCALE)[:, None, None, None]
        eps = (x_t - (1 - t) * z0) / t
        return eps - z0

    g = torch.Generator().manual_seed(0)
    assert flow_loss(oracle, z0, torch.zeros(4, 1, 8), g) < 1e-8
    assert flow_loss(lambda x, c, t: torch.zeros_like(x), z0, torch.zeros(4, 1, 8), g) > 0.5


def _toward(targets: dict[float, torch.Tensor]):
    """A stand-in flow model whose velocity field carries every x_t straight to the point its context names."""
    def model(x, context, timestep):
        target = torch.cat([targets[float(c[0, 0])] for c in context])
        return (x - target) / (timestep / TIME_SCALE)     # v = (x_t - z0) / t on the straight path to z0
    return model


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_euler_on_the_exact_velocity_lands_on_the_data_and_guidance_extrapolates(steps):
    z_cond, z_uncond = torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -0.25)
    model = _toward({1.0: z_cond, 0.0: z_uncond})
    cond, uncond = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    scheduler = FlowScheduler(shift=3.0)
    out = scheduler.sample(model, cond, (1, 4, 2, 2), num_inference_steps=steps, generator=torch.Generator(),
                           progress=False, guidance_scale=1.0)
    torch.testing.assert_close(out, z_cond)
    guided = scheduler.sample(model, cond, (1, 4, 2, 2), num_inference_steps=steps, uncond_context=uncond,
                              guidance_scale=3.0, generator=torch.Generator(), progress=False)
    torch.testing.assert_close(guided, z_uncond + 3.0 * (z_cond - z_uncond))
    # image to image: from the picture noised to t = strength, the same field still ends on the data
    start = scheduler.sample(model, cond, (1, 4, 2, 2), num_inference_steps=steps + 2, generator=torch.Generator(),
                             progress=False, guidance_scale=1.0, init_latents=torch.randn(1, 4, 2, 2), strength=0.7)
    torch.testing.assert_close(start, z_cond)


@pytest.fixture(scope="module")
def pipe(trained):
    out, _ = trained
    return sd.load_checkpoint(out / "model.safetensors", device="cpu")


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate("x", sampler="ddim", progress=False), "its sampler is 'euler'"),
    (lambda p: p.generate("x", eta=0.5, progress=False), "eta applies to sampler='ddim'"),
    (lambda p: p.generate("x", control_image=Image.new("RGB", (16, 16)), progress=False), "ControlNet"),
    (lambda p: p.generate("x", init_image=Image.new("RGB", (16, 16)), mask_image=Image.new("L", (16, 16)),
                          progress=False), "inpainting"),
    (lambda p: p.load_controlnet("missing"), "a ControlNet works with SD's noise-predicting UNet"),
    (lambda p: p.load_lora_weights("missing.safetensors"), "a LoRA file for SD v1.x"),
    (lambda p: p.invert(Image.new("RGB", (16, 16))), "DDIM inversion"),
    (lambda p: p.generate("x", height=18, progress=False), "transformer cuts the latent into 1x1 patches"),
])
def test_what_needs_sds_unet_refuses_the_transformer_in_one_line_and_changes_nothing(pipe, call, message):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=message) as e:
        call(pipe)
    assert "\n" not in str(e.value)
    assert not pipe.controlnets
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_a_transformer_file_without_its_config_or_with_a_unet_too_is_refused(tmp_path, trained):
    out, _ = trained
    model = sd.load_checkpoint(out / "model.safetensors", device="cpu")
    tensors = {f"transformer.{k}": v for k, v in model.unet.state_dict().items()}
    tensors.update({f"clip.{k}": v for k, v in model.clip.state_dict().items()})
    save_safetensors(tensors, tmp_path / "no_config.safetensors", {}, None)
    with pytest.raises(ValueError, match="no transformer config"):
        sd.load_checkpoint(tmp_path / "no_config.safetensors", device="cpu")
    unet = sd.load_checkpoint(DEFAULT_MODEL, device="cpu").unet
    tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
    save_safetensors(tensors, tmp_path / "both.safetensors", {"transformer": model.unet.config.to_dict()}, None)
    with pytest.raises(ValueError, match="both a UNet and a transformer"):
        sd.load_checkpoint(tmp_path / "both.safetensors", device="cpu")


def test_the_cli_generates_with_a_transformer_checkpoint(tmp_path, trained):
    out, _ = trained
    png = tmp_path / "shape.png"
    result = subprocess.run([sys.executable, "-m", "sd", "generate", "a red circle on a blue background",
                             "--checkpoint", str(out / "model.safetensors"), "--steps", "2", "--seed", "0",
                             "--out", str(png)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 euler steps" in result.stdout
    assert Image.open(png).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_the_shipped_transformer_draws_what_the_caption_says():
    from sd.training.evaluation import load_classifier, prompt_accuracy, prompt_set
    model = sd.load_checkpoint(TRANSFORMER_MODEL, device="cpu")
    prompts = [p for p in prompt_set() if p[0][3] == "large"][:6]       # 6 prompts, large shapes in the centre
    report = prompt_accuracy(model, load_classifier(check=False), 5.0, 8, per_prompt=2, seed=0, prompts=prompts)
    assert report["accuracy"] >= 0.75, report
