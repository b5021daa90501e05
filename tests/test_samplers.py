"""The schedule and the samplers give diffusers' numbers, step by step, over whole runs.

Both sides are fed the same deterministic stand-in for the UNet (a fixed function of x, context and t),
so every difference comes from the schedule or the update rule. diffusers' schedulers are configured
like SD v1.5 (its defaults are not SD's).
"""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler)

from sd.diffusion import DiffusionScheduler
from sd.samplers import SAMPLERS, ddim_step, euler_step

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
SHAPE = (2, 4, 8, 8)
CONTEXT_SHAPE = (2, 77, 16)
TOL = 1e-5


def diffusers_scheduler(name, use_karras_sigmas=False):
    if name == "ddim":
        return DDIMScheduler(**SD15, set_alpha_to_one=False, clip_sample=False)
    if name == "ddpm":
        return DDPMScheduler(**SD15, clip_sample=False)
    if name == "euler":
        return EulerDiscreteScheduler(**SD15, use_karras_sigmas=use_karras_sigmas)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**SD15)
    if name == "dpmpp2m":
        return DPMSolverMultistepScheduler(**SD15)
    if name == "lcm":
        return LCMScheduler(**SD15)  # its schedule and step: tests/test_lcm.py
    raise AssertionError(name)


class FakeUNet:
    """A fixed function of (x, context, t) standing in for the UNet; records how it was called."""

    def __init__(self, seed=0):
        self.bias = torch.randn((1,) + SHAPE[1:], generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, x, context, t):
        self.calls.append((tuple(x.shape), tuple(context.shape), t))
        t = torch.as_tensor(t, dtype=torch.float32)
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # makes cond and uncond predictions differ
        return 0.1 * x * torch.cos(t / 100) + self.bias + 2.0 * c


def contexts():
    g = torch.Generator().manual_seed(7)
    return torch.randn(CONTEXT_SHAPE, generator=g), torch.randn(CONTEXT_SHAPE, generator=g)


def seeded(seed=42):
    return torch.Generator().manual_seed(seed)


def sample_with_trajectory(*args, **kwargs):
    """DiffusionScheduler().sample(...) and each step's (t, latent before the step, predicted x_0), via the callback."""
    trajectory = []
    latents = DiffusionScheduler().sample(*args, **kwargs,
                                          callback=lambda i, t, x, pred_x0: trajectory.append((t, x, pred_x0)))
    return latents, trajectory


def reference_run(name, n, unet, context, *, uncond=None, guidance=1.0, noise=None, generator=None,
                  eta=0.0, use_karras_sigmas=False, init=None, strength=1.0):
    """What diffusers' StableDiffusion(Img2Img)Pipeline does, written out over the scheduler.

    Returns (timesteps run, latent before every step, final latent).
    """
    ref = diffusers_scheduler(name, use_karras_sigmas)
    ref.set_timesteps(n)
    timesteps = ref.timesteps
    if noise is None:
        noise = torch.randn(SHAPE, generator=generator)
    if init is None:
        x = noise * ref.init_noise_sigma
    else:
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        timesteps = ref.timesteps[t_start * ref.order:]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * ref.order)
        x = ref.add_noise(init, noise, timesteps[:1].repeat(SHAPE[0]))
    before = []
    for t in timesteps:
        before.append(x)
        if uncond is not None and guidance > 1:
            x_in = ref.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(x_in, torch.cat([uncond, context]), t).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(ref.scale_model_input(x, t), context, t)
        kwargs = {"eta": eta} if name == "ddim" else {}
        if name != "dpmpp2m":
            kwargs["generator"] = generator
        x = ref.step(eps, t, x, **kwargs).prev_sample
    return timesteps, before, x


def assert_same_run(ours, theirs):
    (latents, trajectory), (ref_timesteps, ref_before, ref_final) = ours, theirs
    ts = torch.tensor([t for t, _, _ in trajectory], dtype=torch.float64)
    assert torch.allclose(ts, ref_timesteps.double(), rtol=1e-6, atol=0), (ts, ref_timesteps)
    for i, ((_, x, _), x_ref) in enumerate(zip(trajectory, ref_before)):
        err = (x - x_ref).abs().max() / x_ref.abs().max()
        assert err < TOL, f"step {i}: relative difference {err:.2e}"
    err = (latents - ref_final).abs().max() / ref_final.abs().max()
    assert err < TOL, f"final latents: relative difference {err:.2e}"


DETERMINISTIC = [("ddim", False), ("euler", False), ("euler", True), ("dpmpp2m", False)]


@pytest.mark.parametrize("n", [50, 20, 7, 1])
@pytest.mark.parametrize("name,karras", DETERMINISTIC, ids=["ddim", "euler", "euler_karras", "dpmpp2m"])
def test_deterministic_samplers_match_diffusers_over_full_run(name, karras, n):
    unet, (context, _) = FakeUNet(), contexts()
    noise = torch.randn(SHAPE, generator=seeded())
    ours = sample_with_trajectory(unet, context, SHAPE, num_inference_steps=n, sampler=name, latents=noise,
                                use_karras_sigmas=karras, progress=False)
    assert_same_run(ours, reference_run(name, n, unet, context, noise=noise, use_karras_sigmas=karras))


@pytest.mark.parametrize("n", [50, 7])
@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("euler_a", 0.0), ("ddim", 0.7), ("ddim", 1.0)],
                         ids=["ddpm", "euler_a", "ddim_eta0.7", "ddim_eta1"])
def test_stochastic_samplers_match_diffusers_with_same_seed(name, eta, n):
    unet, (context, _) = FakeUNet(), contexts()
    # both draw the starting noise and every step's noise from equally seeded generators
    ours = sample_with_trajectory(unet, context, SHAPE, num_inference_steps=n, sampler=name, eta=eta,
                                generator=seeded(), progress=False)
    assert_same_run(ours, reference_run(name, n, unet, context, eta=eta, generator=seeded()))


@pytest.mark.parametrize("name", SAMPLERS)
def test_guided_sample_matches_diffusers_hand_loop(name):
    unet, (context, uncond) = FakeUNet(), contexts()
    ours = sample_with_trajectory(unet, context, SHAPE, num_inference_steps=10, sampler=name,
                                uncond_context=uncond, guidance_scale=7.5, generator=seeded(),
                                progress=False)
    # one batched pass per step: (2B, ...) latents, uncond contexts first, t a 0-d tensor
    assert len(unet.calls) == 10
    for x_shape, ctx_shape, t in unet.calls:
        assert x_shape == (2 * SHAPE[0],) + SHAPE[1:] and ctx_shape == (2 * CONTEXT_SHAPE[0],) + CONTEXT_SHAPE[1:]
        assert isinstance(t, torch.Tensor) and t.dim() == 0
    assert_same_run(ours, reference_run(name, 10, unet, context, uncond=uncond, guidance=7.5, generator=seeded()))


def test_guidance_scale_one_runs_a_single_conditional_pass():
    unet, (context, uncond) = FakeUNet(), contexts()
    noise = torch.randn(SHAPE, generator=seeded())
    scheduler = DiffusionScheduler()
    out = scheduler.sample(unet, context, SHAPE, num_inference_steps=5, uncond_context=uncond,
                           guidance_scale=1.0, latents=noise, progress=False)
    assert all(x_shape[0] == SHAPE[0] for x_shape, _, _ in unet.calls)
    unguided = scheduler.sample(FakeUNet(), context, SHAPE, num_inference_steps=5, latents=noise, progress=False)
    assert torch.equal(out, unguided)


@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_start_matches_diffusers(name):
    unet, (context, _) = FakeUNet(), contexts()
    init = torch.randn(SHAPE, generator=seeded(3))
    ours = sample_with_trajectory(unet, context, SHAPE, num_inference_steps=20, sampler=name,
                                init_latents=init, strength=0.6, generator=seeded(),
                                progress=False)
    theirs = reference_run(name, 20, unet, context, init=init, strength=0.6, generator=seeded())
    assert len(ours[1]) == 12  # int(20 * 0.6) steps of the 20
    assert_same_run(ours, theirs)


def test_add_noise_matches_closed_form():
    # the schedule computed independently, in float64
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)
    g = seeded()
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    expected = torch.stack([float(alpha_bar[k]) ** 0.5 * x0[i] + float(1 - alpha_bar[k]) ** 0.5 * noise[i]
                            for i, k in enumerate(t.tolist())])
    scheduler = DiffusionScheduler()
    assert torch.allclose(scheduler.add_noise(x0, noise, t), expected, atol=1e-5)
    one = float(alpha_bar[250]) ** 0.5 * x0 + float(1 - alpha_bar[250]) ** 0.5 * noise
    assert torch.allclose(scheduler.add_noise(x0, noise, 250), one, atol=1e-5)
    assert torch.allclose(scheduler.add_noise(x0, noise, torch.tensor(250)), one, atol=1e-5)


def test_add_noise_rejects_bad_timesteps():
    scheduler, x = DiffusionScheduler(), torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        scheduler.add_noise(x, x, 1000)
    with pytest.raises(ValueError, match="one per sample"):
        scheduler.add_noise(x, x, torch.tensor([1, 2, 3]))


def test_timesteps_for_50_steps_are_981_down_to_1():
    assert DiffusionScheduler().timesteps(50).tolist() == list(range(981, 0, -20))


def test_schedule_matches_sd_v1_facts_and_diffusers():
    s = DiffusionScheduler()
    assert s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, rel=1e-6)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    assert torch.equal(s.alphas_cumprod, DDIMScheduler(**SD15).alphas_cumprod)
    assert torch.allclose(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert s.sigmas[-1].item() == pytest.approx(((1 - 0.0046601) / 0.0046601) ** 0.5, rel=1e-4)  # 14.6


def test_ddim_is_euler_in_sigma_coordinates():
    # DDIM (eta = 0) is exactly Euler's method on x / sqrt(alpha_bar) against sigma (Karras et al. 2022, sec. 4)
    s = DiffusionScheduler()
    g = seeded()
    x_t, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ab_t, ab_prev = s.alphas_cumprod[701].double(), s.alphas_cumprod[681].double()
    x_prev, _ = ddim_step(x_t.double(), eps.double(), ab_t, ab_prev)
    sig_t, sig_prev = ((1 - ab_t) / ab_t) ** 0.5, ((1 - ab_prev) / ab_prev) ** 0.5
    x_euler, _ = euler_step(x_t.double() / ab_t ** 0.5, eps.double(), sig_t, sig_prev)
    assert torch.allclose(x_prev / ab_prev ** 0.5, x_euler, atol=1e-10)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_step_counts_raise(steps):
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="num_inference_steps must be an integer from 1 to 1000"):
        DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusionScheduler().timesteps(steps)


@pytest.mark.parametrize("strength", [0, 1.5, -0.2])
def test_bad_strength_raises(strength):
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        DiffusionScheduler().sample(unet, context, SHAPE, init_latents=torch.zeros(SHAPE), strength=strength,
                                    progress=False)


def test_strength_too_small_for_the_step_count_raises():
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="leaves no step"):
        DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=10, init_latents=torch.zeros(SHAPE),
                                    strength=0.05, progress=False)


def test_unknown_sampler_lists_the_known_ones():
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddpm, ddim, euler, euler_a, dpmpp2m, lcm"):
        DiffusionScheduler().sample(unet, context, SHAPE, sampler="heun", progress=False)
    assert SAMPLERS == ("ddpm", "ddim", "euler", "euler_a", "dpmpp2m", "lcm")


def test_options_for_other_samplers_are_rejected():
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        DiffusionScheduler().sample(unet, context, SHAPE, sampler="euler", eta=0.5, progress=False)
    with pytest.raises(ValueError, match="use_karras_sigmas applies to sampler='euler' only"):
        DiffusionScheduler().sample(unet, context, SHAPE, sampler="ddim", use_karras_sigmas=True, progress=False)


def test_mismatched_context_batch_raises():
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="context has batch 2, expected 1 or the latent batch 3"):
        DiffusionScheduler().sample(unet, context, (3, 4, 8, 8), progress=False)


def test_progress_false_prints_nothing_and_progress_true_shows_a_bar(capsys):
    unet, (context, _) = FakeUNet(), contexts()
    DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=3, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_callback_gets_each_ddim_step_and_its_predicted_x0():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # independent float64 schedule
    alpha_bar = np.cumprod(1 - betas)
    unet, (context, _) = FakeUNet(), contexts()
    seen = []
    DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=10, sampler="ddim", generator=seeded(),
                                callback=lambda i, t, x_t, pred_x0: seen.append((i, t, x_t, pred_x0)),
                                progress=False)
    assert [i for i, *_ in seen] == list(range(10))
    assert [t for _, t, *_ in seen] == list(range(901, 0, -100))
    i, t, x_t, pred_x0 = seen[4]
    eps = unet(x_t, context, torch.tensor(t))
    ab = float(alpha_bar[t])
    assert torch.allclose(pred_x0, (x_t - (1 - ab) ** 0.5 * eps) / ab ** 0.5, atol=1e-5)


def test_seed_call_returns_latents_of_the_requested_shape():
    unet = FakeUNet()
    unet.bias = torch.zeros(1, 4, 64, 64)
    context = torch.randn(1, 77, 16, generator=seeded())
    samples = DiffusionScheduler().sample(unet, context, shape=(1, 4, 64, 64))
    assert samples.shape == (1, 4, 64, 64) and torch.isfinite(samples).all()


def test_given_latents_equal_the_same_seeded_draw():
    unet, (context, _) = FakeUNet(), contexts()
    s = DiffusionScheduler()
    a = s.sample(unet, context, SHAPE, num_inference_steps=5, sampler="euler", generator=seeded(), progress=False)
    noise = torch.randn(SHAPE, generator=seeded())
    b = s.sample(unet, context, num_inference_steps=5, sampler="euler", latents=noise, progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,karras", DETERMINISTIC + [("ddpm", False), ("euler_a", False)],
                         ids=["ddim", "euler", "euler_karras", "dpmpp2m", "ddpm", "euler_a"])
def test_noise_levels_are_diffusers_timesteps_and_sigmas(name, karras):
    ref = diffusers_scheduler(name, karras)
    ref.set_timesteps(20)
    levels = DiffusionScheduler().noise_levels(20, name, use_karras_sigmas=karras)
    assert torch.allclose(levels.timesteps.double(), ref.timesteps.double(), rtol=1e-6, atol=0)
    assert levels.alpha_bars.shape == levels.sigmas.shape == (21,)  # where each step starts, and the last lands
    if hasattr(ref, "sigmas"):  # Euler-type and DPM-Solver: the noise levels themselves
        assert torch.allclose(levels.sigmas, ref.sigmas.float(), rtol=1e-6, atol=0)
    if name == "ddim":  # SD's DDIM ends on alpha_bar_0 = 0.99915 (set_alpha_to_one False), the others on x_0
        assert levels.alpha_bars[-1].item() == pytest.approx(0.99915, rel=1e-6)
    else:
        assert levels.alpha_bars[-1].item() == 1.0 and levels.sigmas[-1].item() == 0.0


def test_img2img_callback_counts_the_steps_of_the_whole_run():
    unet, (context, _) = FakeUNet(), contexts()
    seen = []
    DiffusionScheduler().sample(unet, context, SHAPE, num_inference_steps=20, init_latents=torch.zeros(SHAPE),
                                strength=0.6, generator=seeded(), progress=False,
                                callback=lambda i, t, x_t, pred_x0: seen.append((i, t)))
    ref = diffusers_scheduler("ddim")
    ref.set_timesteps(20)
    assert seen == list(zip(range(8, 20), ref.timesteps[8:].tolist()))  # the last int(20 * 0.6) = 12 steps


@pytest.mark.parametrize("given", ["latents", "init_latents"])
def test_explicit_shape_that_disagrees_with_the_given_latents_raises(given):
    unet, (context, _) = FakeUNet(), contexts()
    # the seed's default shape, given explicitly, is not silently replaced by the latents' shape
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64, 64\) disagrees with the given latents \(2, 4, 8, 8\)"):
        DiffusionScheduler().sample(unet, context, (1, 4, 64, 64), progress=False, **{given: torch.zeros(SHAPE)})


def test_negative_eta_raises():
    unet, (context, _) = FakeUNet(), contexts()
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DiffusionScheduler().sample(unet, context, SHAPE, sampler="ddim", eta=-0.5, progress=False)


def test_dpm_solver_keeps_no_memory_between_runs():
    """The multistep memory is local to a run: an image-to-image run first does not change the next full run."""
    unet, (context, _) = FakeUNet(), contexts()
    s, noise = DiffusionScheduler(), torch.randn(SHAPE, generator=seeded())
    fresh = s.sample(unet, context, num_inference_steps=8, sampler="dpmpp2m", latents=noise, progress=False)
    s.sample(unet, context, num_inference_steps=8, sampler="dpmpp2m", latents=noise, init_latents=noise * 0.5,
             strength=0.5, progress=False)
    again = s.sample(unet, context, num_inference_steps=8, sampler="dpmpp2m", latents=noise, progress=False)
    assert torch.equal(fresh, again)
