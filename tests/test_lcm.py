"""sampler="lcm": diffusers' LCMScheduler's timesteps and numbers over whole runs, the LCM-LoRA layout, the API and CLI.

The runs feed both loops the same deterministic stand-in for the UNet and equally seeded generators, so the
starting noise and the fresh noise drawn between steps are the same draws on both sides: any difference comes from
the schedule, the boundary conditions or the update. diffusers' LCMScheduler is built from SD v1.5's scheduler
config, as LCM-LoRA users do (`LCMScheduler.from_config(pipe.scheduler.config)`).
"""
import pytest
import torch
import transformers
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

import sd
from sd.cli import main
from sd.diffusion import DiffusionScheduler
from sd.samplers import NoiseLevels, consistency_scalings, lcm_timesteps, sample_lcm
from tests.reference import reference_and_ours, rel_err
from tests.test_lora import RANK, adapted_layers, random_lora, write_kohya_file
from tests.test_tokenizer import _clip_merges_gz, _write_standard_clip_tokenizer_folder

# SD v1.5's scheduler_config.json (the fields LCMScheduler reads), as from_config hands them over.
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
SHAPE = (2, 4, 8, 8)
CONTEXT_SHAPE = (2, 77, 16)
TOL = 1e-6                  # float32: max abs difference relative to the largest value (the fake UNet's x0 reach ~100)
PIXEL_TOL = 1e-4            # the decoded pictures, as tests/test_pipeline.py
# The layers diffusers' LCM-LoRA script (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py) adapts.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


class FakeUNet:
    """A fixed function of (x, context, t) standing in for the UNet (cond and uncond predictions differ)."""

    def __init__(self, seed=0):
        self.bias = torch.randn((1,) + SHAPE[1:], generator=torch.Generator().manual_seed(seed))
        self.batches = []

    def __call__(self, x, context, t):
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float32)
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.1 * x * torch.cos(t / 100) + self.bias + 2.0 * c


def contexts():
    g = torch.Generator().manual_seed(7)
    return torch.randn(CONTEXT_SHAPE, generator=g), torch.randn(CONTEXT_SHAPE, generator=g)


def close(a, b):
    return (a - b).abs().max() <= TOL * b.abs().max()


def seeded(seed=42):
    return torch.Generator().manual_seed(seed)


def diffusers_lcm_run(n, unet, context, uncond, guidance, generator):
    """StableDiffusionPipeline's loop over LCMScheduler, written out: (timesteps, x before each step, denoised, final)."""
    ref = LCMScheduler.from_config(SD15)
    ref.set_timesteps(n)
    x = torch.randn(SHAPE, generator=generator) * ref.init_noise_sigma       # prepare_latents
    before, denoised = [], []
    for t in ref.timesteps:
        before.append(x)
        if guidance > 1:                                                     # do_classifier_free_guidance
            eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([uncond, context]), t).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(x, context, t)
        out = ref.step(eps, t, x, generator=generator)                       # the step draws its noise from it
        x = out.prev_sample
        denoised.append(out.denoised)
    return ref.timesteps, before, denoised, x


# --- the schedule -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [
    # the 50 distillation timesteps 999, 979, ..., 19 taken at positions floor(i * 50 / n)
    (1, [999]),
    (2, [999, 499]),                                   # positions 0, 25
    (4, [999, 759, 499, 259]),                         # positions 0, 12, 25, 37
    (8, [999, 879, 759, 639, 499, 379, 259, 139]),     # positions 0, 6, 12, 18, 25, 31, 37, 43
])
def test_lcm_visits_the_timesteps_lcmscheduler_sets_for_1_2_4_8_steps(n, expected):
    for config in (SD15, {}):                          # SD v1.5's config or LCMScheduler's own defaults: the same
        ref = LCMScheduler.from_config(config) if config else LCMScheduler()
        ref.set_timesteps(n)
        assert ref.timesteps.tolist() == expected
    assert DiffusionScheduler().timesteps(n, "lcm").tolist() == expected


def test_lcm_timesteps_equal_lcmschedulers_for_every_step_count_up_to_50():
    for n in range(1, 51):
        ref = LCMScheduler.from_config(SD15)
        ref.set_timesteps(n)
        assert lcm_timesteps(n, 1000).tolist() == ref.timesteps.tolist(), n


# --- the boundary conditions --------------------------------------------------------------------------------------
def test_consistency_function_is_the_identity_at_t0_and_almost_x0_at_sd_timesteps():
    c_skip, c_out = consistency_scalings(torch.tensor(0))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0            # f(x, 0) = x: the boundary condition
    ref = LCMScheduler.from_config(SD15)
    for t in torch.tensor([0, 1, 19, 259, 499, 999]):
        ours, theirs = consistency_scalings(t), ref.get_scalings_for_boundary_condition_discrete(t)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    # sigma_data = 0.5, s = 10 t, from the definition: at t = 19, c_skip = 0.25 / (190^2 + 0.25)
    c_skip, c_out = consistency_scalings(torch.tensor(19))
    assert c_skip.item() == pytest.approx(0.25 / (190 ** 2 + 0.25), rel=1e-6)
    assert c_out.item() == pytest.approx(190 / (190 ** 2 + 0.25) ** 0.5, rel=1e-6)


# --- whole runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 1.5], ids=["guidance1", "guidance1.5"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_lcm_run_matches_lcmscheduler_step_by_step_with_the_same_generator(n, guidance):
    (context, uncond), unet = contexts(), FakeUNet()
    steps = []
    ours = DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=n, sampler="lcm",
                                       uncond_context=uncond, guidance_scale=guidance, generator=seeded(),
                                       progress=False, callback=lambda i, t, x, x0: steps.append((t, x, x0)))
    timesteps, before, denoised, final = diffusers_lcm_run(n, FakeUNet(), context, uncond, guidance, seeded())
    assert [t for t, _, _ in steps] == timesteps.tolist()
    for (_, x, x0), x_ref, x0_ref in zip(steps, before, denoised):
        assert close(x, x_ref) and close(x0, x0_ref)
    assert close(ours, final)
    # guidance 1 runs the conditional pass alone, as diffusers does; above 1, one batched pass of both
    assert unet.batches == [SHAPE[0] * (2 if guidance > 1 else 1)] * n


def test_lcm_keeps_c_skip_of_x_near_t0_as_lcmscheduler_does():
    # at SD's schedule c_skip < 1e-5 would hide a dropped c_skip x_t term; near t = 0 it is large (t = 1: 0.0025)
    (context, _), alphas_cumprod = contexts(), DiffusionScheduler().alphas_cumprod
    timesteps = torch.tensor([99, 9, 1])
    levels = NoiseLevels(timesteps, torch.cat([alphas_cumprod[timesteps], torch.ones(1)]), torch.zeros(4))
    unet, x_T = FakeUNet(), torch.randn(SHAPE, generator=seeded(2))
    ours = sample_lcm(lambda x, t: unet(x, context, t), x_T, levels, generator=seeded())
    ref = LCMScheduler.from_config(SD15)
    ref.set_timesteps(timesteps=timesteps.tolist())
    x, g = x_T, seeded()
    for t in ref.timesteps:
        x = ref.step(unet(x, context, t), t, x, generator=g).prev_sample
    assert close(ours, x)
    assert consistency_scalings(torch.tensor(1))[0].item() > 1e-3


def test_lcm_draws_fresh_noise_between_steps_and_none_after_the_last():
    (context, _), scheduler = contexts(), DiffusionScheduler()
    noise = torch.randn(SHAPE, generator=seeded(1))
    run = lambda n, seed: scheduler.sample(FakeUNet(), context, SHAPE, num_inference_steps=n, sampler="lcm",
                                           latents=noise, generator=seeded(seed), progress=False)
    assert torch.equal(run(1, 0), run(1, 1))         # one step: the clean estimate, no noise drawn
    assert not torch.allclose(run(4, 0), run(4, 1))  # more: the noise between steps comes from the generator
    assert torch.equal(run(4, 3), run(4, 3))


def test_lcm_refuses_more_steps_than_its_50_original_ones():
    context, _ = contexts()
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer from 1 to 50 with sampler='lcm'"):
        DiffusionScheduler().sample(FakeUNet(), context, SHAPE, num_inference_steps=51, sampler="lcm", progress=False)
    assert len(DiffusionScheduler().timesteps(50, "lcm")) == 50


# --- the pipeline: generate(sampler="lcm") against diffusers' StableDiffusionPipeline with LCMScheduler -----------
def pipelines(tmp_path, seed=5):
    """Our pipeline and diffusers' (LCMScheduler from SD v1.5's config) on the very same random tiny weights."""
    ref, ours = reference_and_ours(seed=seed)
    folder = _write_standard_clip_tokenizer_folder(_clip_merges_gz(), tmp_path / "tokenizer")
    theirs = StableDiffusionPipeline(
        vae=ref["vae"], text_encoder=ref["clip"], unet=ref["unet"], scheduler=LCMScheduler.from_config(SD15),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return sd.StableDiffusion(**ours, tokenizer=sd.CLIPTokenizer(folder)), theirs, ref


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_generate_with_lcm_matches_diffusers_pipeline_with_lcmscheduler(tmp_path, guidance):
    mine, theirs, _ = pipelines(tmp_path)
    with torch.no_grad():
        expected = theirs("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = mine.generate("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
                        sampler="lcm", seed=3, output_type="pt", progress=False)
    assert (got - expected).abs().max() < PIXEL_TOL


def write_peft_unet_file(path, unet_lora, alpha):
    """diffusers' own layout, the UNet alone: `unet.<module>.lora_A.weight`, alpha in PEFT's config in the metadata."""
    import json
    tensors = {}
    for name, (down, up) in unet_lora.items():
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
    config = {"unet.r": RANK, "unet.lora_alpha": alpha, "unet.target_modules": sorted(unet_lora)}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


@pytest.mark.parametrize("layout", ["diffusers_peft", "kohya"])
def test_lcm_lora_layout_loads_and_gives_diffusers_pictures(tmp_path, layout):
    """A fake LCM-LoRA: every layer kind the LCM-LoRA script adapts (convolutions and time projections too), at
    tiny widths; loaded by both pipelines, then 4 LCM steps at guidance 1.5 give the same picture."""
    mine, theirs, ref = pipelines(tmp_path, seed=6)
    layers = adapted_layers(ref["unet"], LCM_LORA_TARGETS)
    kinds = {next(k for k in LCM_LORA_TARGETS if name.endswith(k)) for name in layers}
    assert kinds == set(LCM_LORA_TARGETS)                  # the tiny UNet has every kind of adapted layer
    unet_lora = random_lora(layers, seed=8)
    path = tmp_path / "lcm_lora.safetensors"
    if layout == "kohya":
        write_kohya_file(path, unet_lora, {})
    else:
        write_peft_unet_file(path, unet_lora, alpha=2.5)
    before = mine.generate("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.5,
                           sampler="lcm", seed=3, output_type="pt", progress=False)

    theirs.load_lora_weights(str(path))
    counts = mine.load_lora_weights(path)

    assert counts == {"unet": len(layers), "text_encoder": 0}
    with torch.no_grad():
        expected = theirs("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.5,
                          generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = mine.generate("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.5,
                        sampler="lcm", seed=3, output_type="pt", progress=False)
    assert rel_err(got, before) > 1e-3                     # the LoRA changed the picture
    assert (got - expected).abs().max() < PIXEL_TOL


def test_generate_refuses_lcm_steps_above_50_before_any_work(tmp_path):
    mine, _, _ = pipelines(tmp_path)
    calls = []
    mine.clip.forward = lambda *a, **k: calls.append(a)      # any work would call the text encoder first
    with pytest.raises(ValueError, match=r"^num_inference_steps must be an integer from 1 to 50 with "
                                         r"sampler='lcm' \(LCM picks its steps from the 50 timesteps"):
        mine.generate("a cat", num_inference_steps=60, sampler="lcm", progress=False)
    assert calls == []


# --- the command line ---------------------------------------------------------------------------------------------
def test_python_m_sd_generate_with_lcm_at_4_steps_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "lcm.png"
    assert main(["generate", "a red circle on a blue background", "--sampler", "lcm", "--steps", "4",
                 "--cfg", "1.5", "--seed", "0", "--out", str(out)]) == 0       # the shipped small model
    assert "4 lcm steps, cfg 1.5" in capsys.readouterr().out
    assert out.is_file()


def test_cli_refuses_lcm_steps_above_50_before_loading_the_model(tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(sd.cli.generate, "load_checkpoint", lambda *a, **k: loaded.append(a))
    assert main(["generate", "x", "--sampler", "lcm", "--steps", "60", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m sd generate: error: num_inference_steps must be an integer from 1 to 50 "
                          "with sampler='lcm'") and len(err.splitlines()) == 1
    assert loaded == []


def test_generate_help_lists_lcm_and_its_step_limit(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lcm" in text and "1..50 with lcm" in text
