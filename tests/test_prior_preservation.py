"""sd.adapters.prior_preservation: DreamBooth's loss (Ruiz et al. 2023, eq. 2) in diffusers' practical form.

The expected values come from sd.diffusion.diffusion_loss, written and tested on its own: with equal batch sizes and
lambda = 1, the mean over the concatenated batch is half the sum of the two terms; with lambda = 0, the loss is the
instance pictures' own MSE computed with the same random numbers.
"""
import pytest
import torch

from sd.adapters.prior_preservation import PRIOR_LOSS_WEIGHT, prior_preservation_loss
from sd.config import UNetConfig
from sd.diffusion import DiffusionScheduler, diffusion_loss
from sd.unet import DiffusionUNET


def _unet() -> DiffusionUNET:
    torch.manual_seed(0)
    return DiffusionUNET(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                    heads=2, context_dim=32, norm_groups=8, sample_size=4)).eval()


def _batches(b: int = 3, c: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 4, 4, generator=g), torch.randn(b, 5, 32, generator=g),
            torch.randn(c, 4, 4, 4, generator=g), torch.randn(c, 5, 32, generator=g))


def test_equal_batches_at_lambda_one_give_twice_the_mean_over_the_concatenated_batch():
    unet, scheduler = _unet(), DiffusionScheduler()
    zi, ci, zc, cc = _batches()
    ours = prior_preservation_loss(unet, scheduler, zi, ci, zc, cc, torch.Generator().manual_seed(5), 1.0)
    plain = diffusion_loss(unet, scheduler, torch.cat([zi, zc]), torch.cat([ci, cc]), torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, 2 * plain, atol=1e-6, rtol=1e-6)


def test_lambda_zero_is_the_instance_loss_and_the_class_batch_does_not_enter_it():
    unet, scheduler = _unet(), DiffusionScheduler()
    zi, ci, zc, cc = _batches(b=2, c=3)
    ours = prior_preservation_loss(unet, scheduler, zi, ci, zc, cc, torch.Generator().manual_seed(5), 0.0)
    # the same random numbers: 5 timesteps, then the noise of 5 pictures; the instance pictures are the first 2
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, scheduler.num_train_timesteps, (5,), generator=g)[:2]
    eps = torch.randn(5, 4, 4, 4, generator=g)[:2]
    expected = (unet(scheduler.add_noise(zi, eps, t), ci, t) - eps).pow(2).mean()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    other = prior_preservation_loss(unet, scheduler, zi, ci, 5 + zc, 3 * torch.randn_like(cc),
                                    torch.Generator().manual_seed(5), 0.0)
    torch.testing.assert_close(other, ours, atol=1e-6, rtol=1e-6)


def test_lambda_multiplies_the_prior_term_only():
    unet, scheduler = _unet(), DiffusionScheduler()
    batches = _batches(b=2, c=4)
    loss = {w: prior_preservation_loss(unet, scheduler, *batches, torch.Generator().manual_seed(7), w)
            for w in (0.0, 1.0, 2.5)}
    prior = loss[1.0] - loss[0.0]
    assert prior > 0
    torch.testing.assert_close(loss[2.5], loss[0.0] + 2.5 * prior, atol=1e-5, rtol=1e-5)
    assert PRIOR_LOSS_WEIGHT == 1.0                                   # diffusers' default, Ruiz et al.'s lambda


def test_gradients_reach_the_unet_through_both_terms():
    unet, scheduler = _unet(), DiffusionScheduler()
    zi, ci, zc, cc = _batches()
    prior_preservation_loss(unet, scheduler, zi, ci, zc, cc, torch.Generator().manual_seed(3)).backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("change, message", [
    (dict(prior_weight=-1.0), "prior_weight must be a number >= 0"),
    (dict(prior_weight=float("nan")), "prior_weight must be a number >= 0"),
    (dict(prior_weight=True), "prior_weight must be a number >= 0"),
    (dict(class_context=torch.randn(2, 5, 32)), "class_latents (N, 4, h, w) and class_context"),
    (dict(instance_latents=torch.randn(2, 4, 4, 4)), "instance_latents (N, 4, h, w) and instance_context"),
    (dict(class_latents=torch.randn(3, 4, 8, 8)), "the same latent and text shapes"),
])
def test_bad_inputs_get_a_one_line_error_before_the_unet_runs(change, message):
    zi, ci, zc, cc = _batches()
    args = dict(instance_latents=zi, instance_context=ci, class_latents=zc, class_context=cc, prior_weight=1.0)
    args.update(change)
    calls = []
    with pytest.raises(ValueError) as info:
        prior_preservation_loss(lambda *a: calls.append(a), DiffusionScheduler(), generator=torch.Generator(),
                                **args)
    assert message in str(info.value) and "\n" not in str(info.value) and not calls
