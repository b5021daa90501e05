"""The exercise checks of notebook 06 (forward diffusion): the references are right, correct code written another
way passes, plausible wrong code is named, and a wrong answer the checks do not know points to the hints.

The references are compared with diffusers (its DDPMScheduler's add_noise and get_velocity) and with facts that
follow from the forward process; the wrong implementations below are written the way a learner would write them.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sd.course.checks import check_identify, check_predictions, check_shift_schedule, pick
from sd.course.checks.diffusion import reference_identify, reference_predictions, reference_shift_schedule
from sd.diffusion import DiffusionScheduler
from tests.check_helpers import rejects, rejects_unrecognised


def _sd_diffusers() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------------------------------------------------
# 6.1 x_0, eps and v from any one of them
# ---------------------------------------------------------------------------------------------------------

def test_reference_predictions_give_back_diffusers_x0_noise_and_velocity_from_each_kind():
    scheduler = _sd_diffusers()
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    t = torch.tensor([10, 400, 990])
    x_t = scheduler.add_noise(x0, eps, t)
    v = scheduler.get_velocity(x0, eps, t)
    alpha_bar = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    for kind, output in [("epsilon", eps), ("x0", x0), ("v", v)]:
        got = reference_predictions(output, kind, x_t, alpha_bar)
        for name, value, expected in zip(["x0", "eps", "v"], got, [x0, eps, v]):
            torch.testing.assert_close(value, expected, atol=2e-4, rtol=1e-4, msg=f"{name} from {kind}")


def predictions_by_angle(output, kind, x_t, alpha_bar_t):
    """Right, written as a rotation by phi with cos(phi) = sqrt(alpha_bar)."""
    phi = torch.arccos(alpha_bar_t.sqrt())
    c, s = torch.cos(phi), torch.sin(phi)
    if kind == "v":
        x0, eps = c * x_t - s * output, s * x_t + c * output
    elif kind == "x0":
        x0, eps = output, (x_t - c * output) / s
    else:
        x0, eps = (x_t - s * output) / c, output
    return x0, eps, c * eps - s * x0


def predictions_with(**how):
    """A learner's conversions with one slip (spelled out in the branches)."""
    def convert(output, kind, x_t, alpha_bar_t):
        a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
        if how.get("no_roots"):
            a, s = alpha_bar_t, 1 - alpha_bar_t
        if kind == "epsilon":
            eps = output
            x0 = x_t / a if how.get("ignores_noise") else (x_t - s * eps) / a
        elif kind == "x0":
            x0 = output
            eps = (x_t - a * x0) / s
        elif how.get("v_like_eps"):
            x0 = (x_t - s * output) / a
            eps = (x_t - a * x0) / s
        else:
            v = -output if how.get("v_flipped") else output
            x0, eps = a * x_t - s * v, s * x_t + a * v
        v = s * x0 - a * eps if how.get("v_flipped") else a * eps - s * x0
        return (eps, x0, v) if how.get("swapped") else (x0, eps, v)
    return convert


def test_check_predictions_passes_the_reference_and_a_rotation():
    assert check_predictions(reference_predictions) and check_predictions(predictions_by_angle)
    assert check_predictions(predictions_with())


@pytest.mark.parametrize("how, mistake", [
    ({"v_flipped": True}, "v has the other sign"),
    ({"no_roots": True}, "the square roots are missing"),
    ({"v_like_eps": True}, "read as if it were the noise"),
    ({"swapped": True}, "the first two outputs are swapped"),
])
def test_check_predictions_names_the_mistake(how, mistake):
    rejects(check_predictions, predictions_with(**how), "check_predictions failed", "Hint: ", mistake)


def test_check_predictions_points_to_the_hints_for_an_unknown_mistake():
    rejects_unrecognised(check_predictions, predictions_with(ignores_noise=True), "6.1")


# ---------------------------------------------------------------------------------------------------------
# 6.2 the ideal observer
# ---------------------------------------------------------------------------------------------------------

def identify_in_a_loop(x_t, candidates, alpha_bar_t):
    """Right, written with a loop over the candidates and the Gaussian's log-density."""
    a = math.sqrt(float(alpha_bar_t))
    scores = torch.stack([-((x_t - a * c) ** 2).sum(dim=(1, 2, 3)) / (2 * (1 - float(alpha_bar_t)))
                          for c in candidates], dim=1)                    # (B, N) log q(x_t | c), up to a constant
    return scores.argmax(dim=1)


def identify_with(**how):
    def identify(x_t, candidates, alpha_bar_t):
        scaled = candidates if how.get("unscaled") else math.sqrt(alpha_bar_t) * candidates
        if how.get("dot"):
            return torch.einsum("bchw,nchw->bn", x_t, scaled).argmax(dim=1)
        d = ((x_t[:, None] - scaled[None]) ** 2).sum(dim=(2, 3, 4))       # (B, N)
        if how.get("l1"):
            d = (x_t[:, None] - scaled[None]).abs().sum(dim=(2, 3, 4))
        return d if how.get("distances") else d.argmin(dim=1)
    return identify


def test_reference_identify_is_always_right_without_noise_and_at_chance_without_signal():
    generator = torch.Generator().manual_seed(1)
    candidates = torch.randn(32, 3, 8, 8, generator=generator)
    which = torch.arange(32).repeat(8)
    assert torch.equal(reference_identify(candidates[which], candidates, 1.0), which)
    noise_only = torch.randn(256, 3, 8, 8, generator=generator)
    rate = (reference_identify(noise_only, candidates, 0.0) == which).float().mean()
    assert rate < 0.1            # chance is 1/32; with no signal the answer cannot beat it by much


def test_check_identify_passes_the_reference_and_a_log_density_loop():
    assert check_identify(reference_identify) and check_identify(identify_in_a_loop) and check_identify(identify_with())


@pytest.mark.parametrize("how, mistake", [
    ({"unscaled": True}, "compared as they are"),
    ({"dot": True}, "the largest dot product"),
    ({"distances": True}, "the squared distances of every pair"),
])
def test_check_identify_names_the_mistake(how, mistake):
    rejects(check_identify, identify_with(**how), "check_identify failed", "Hint: ", mistake)


def test_check_identify_points_to_the_hints_for_an_unknown_mistake():
    rejects_unrecognised(check_identify, identify_with(l1=True), "6.2")


# ---------------------------------------------------------------------------------------------------------
# 6.3 the shifted schedule
# ---------------------------------------------------------------------------------------------------------

def shift_in_log_snr(alphas_cumprod, scale):
    """Right, written as a shift of the log-SNR by -2 log(scale) and a sigmoid back."""
    log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)
    return torch.sigmoid(log_snr - 2 * math.log(scale))


def test_reference_shift_divides_every_snr_by_the_square_of_the_scale():
    alpha_bar = DiffusionScheduler().alphas_cumprod.double()
    shifted = reference_shift_schedule(alpha_bar, 4.0)
    ratio = (shifted / (1 - shifted)) / (alpha_bar / (1 - alpha_bar))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / 16))
    assert bool((shifted < alpha_bar).all())          # more noise at every step


def test_identification_of_a_picture_upsampled_k_times_on_the_shifted_schedule_matches_the_small_one():
    """Why 6.3 divides by k squared: the ideal observer's odds on a k x k nearest-upsampled picture with SNR / k^2
    are those on the small picture with SNR (the same noise drawn per block, averaged)."""
    generator = torch.Generator().manual_seed(2)
    small = torch.randn(16, 3, 4, 4, generator=generator)
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)      # (16, 3, 8, 8)
    which = torch.arange(16).repeat(64)
    alpha_bar = torch.tensor([0.02])
    shifted = float(reference_shift_schedule(alpha_bar, 2.0))
    noise_big = torch.randn(len(which), 3, 8, 8, generator=generator)
    # the block means of the big picture's noise, times 2, are standard normal: the small picture's noise
    noise_small = 2 * torch.nn.functional.avg_pool2d(noise_big, 2)
    x_small = 0.02 ** 0.5 * small[which] + 0.98 ** 0.5 * noise_small
    x_big = shifted ** 0.5 * big[which] + (1 - shifted) ** 0.5 * noise_big
    assert torch.equal(reference_identify(x_small, small, 0.02), reference_identify(x_big, big, shifted))


def test_check_shift_schedule_passes_the_reference_and_a_log_snr_shift():
    assert check_shift_schedule(reference_shift_schedule) and check_shift_schedule(shift_in_log_snr)


@pytest.mark.parametrize("impl, mistake", [
    (lambda ab, k: (ab / (1 - ab) / k) / (1 + ab / (1 - ab) / k), "divided by the side ratio"),
    (lambda ab, k: (ab / (1 - ab) * k ** 2) / (1 + ab / (1 - ab) * k ** 2), "multiplied by k²"),
    (lambda ab, k: ab / (1 - ab) / k ** 2, "this is the shifted SNR"),
    (lambda ab, k: ab / k ** 2, "ᾱ itself is divided by k²"),
])
def test_check_shift_schedule_names_the_mistake(impl, mistake):
    rejects(check_shift_schedule, impl, "check_shift_schedule failed", "Hint: ", mistake)


def test_check_shift_schedule_points_to_the_hints_for_an_unknown_mistake():
    rejects_unrecognised(check_shift_schedule, lambda ab, k: ab ** (k ** 2), "6.3")


def test_pick_goes_on_with_the_reference_when_the_conversion_is_wrong(capsys):
    assert pick(check_predictions, predictions_with(v_flipped=True),
                reference=reference_predictions) is reference_predictions
    out = capsys.readouterr().out
    assert "❌ check_predictions failed" in out and "using the reference" in out
