"""sd.pixel_unet is notebook 04's pixel model and schedule: the same outputs on the same weights, and the cosine
schedule as diffusers computes it."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from benchmarks.pixel_min_snr import notebook_definitions
from sd.pixel_unet import IMAGE_SIZE, TinyUNet, cosine_alpha_bar, load_pixel_unet


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
