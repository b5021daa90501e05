"""sd.pixel_unet is notebook 04's pixel model and schedule: the same outputs on the same weights, and the cosine
schedule as diffusers computes it."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from benchmarks.pixel_min_snr import notebook_definitions
from sd.pixel_unet import IMAGE_SIZE, TinyUNet, cosine_alpha_bar, load_pixel_unet, sample_eps_clipped


def test_cosine_alpha_bar_matches_diffusers_squaredcos_cap_v2():
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(cosine_alpha_bar(), reference.float(), rtol=1e-5, atol=1e-7)


def test_the_package_model_is_notebook_04s_on_the_same_weights():
    nb = notebook_definitions()
    torch.manual_seed(0)
    theirs = nb["TinyUNet"]().eval()
    ours = TinyUNet().eval()
    ours.load_state_dict(theirs.state_dict())          # same names and shapes, or this raises
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=0, atol=0)
    assert nb["IMAGE_SIZE"] == IMAGE_SIZE


def test_load_pixel_unet_refuses_an_unknown_objective():
    with pytest.raises(ValueError, match="objective must be one of eps, flow, got 'v'"):
        load_pixel_unet("v")


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_clipped_ddim_with_the_true_noise_returns_the_picture_in_any_number_of_steps(steps):
    """An oracle that knows x0 predicts the exact noise of every x_t; DDIM then lands on x0 (eq. 12 is exact).
    In float64: at t = 999 dividing by sqrt(alpha_bar) = 5e-5 turns float32 rounding into 2e-3."""
    alpha_bar = cosine_alpha_bar().double()
    x0 = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn_like(x0)

    def oracle(x, t):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    start = alpha_bar[999].sqrt() * x0 + (1 - alpha_bar[999]).sqrt() * noise
    torch.testing.assert_close(sample_eps_clipped(oracle, start, steps, alpha_bar), x0, rtol=0, atol=1e-9)


def test_clipping_keeps_a_wild_noise_prediction_inside_the_pixel_range():
    """Unclipped, a noise prediction off by 0.1 at t = 999 implies an x0 of thousands; clipped, the result stays in
    [-1, 1] and is not a constant."""
    alpha_bar = cosine_alpha_bar()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = sample_eps_clipped(lambda y, t: 0.9 * y, x, 4, alpha_bar)
    assert float(out.abs().max()) <= 1 and float(out.std()) > 0.1
