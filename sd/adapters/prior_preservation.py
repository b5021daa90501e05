"""DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2): fine-tune on a few pictures of a subject and,
in the same step, on the model's own pictures of the subject's class, so that the class prompt keeps drawing what
it drew before.

The practical form is diffusers' `examples/dreambooth/train_dreambooth_lora.py` (`--with_prior_preservation`,
`--prior_loss_weight`, default 1.0): the instance batch and the class batch are concatenated (instance first),
noised to random timesteps in one go, passed through the UNet in one call, and the prediction is split again;
the loss is the instance half's mean squared error plus prior_weight times the class half's. The class pictures
are generated once, before fine-tuning, by the frozen model from the class prompt ("a [class noun]").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion import DiffusionScheduler

# diffusers' train_dreambooth_lora.py default for --prior_loss_weight; Ruiz et al. 2023 (sec. 4) use lambda = 1 too.
PRIOR_LOSS_WEIGHT = 1.0


def prior_preservation_loss(unet, scheduler: DiffusionScheduler, instance_latents: torch.Tensor,
                            instance_context: torch.Tensor, class_latents: torch.Tensor, class_context: torch.Tensor,
                            generator: torch.Generator, prior_weight: float = PRIOR_LOSS_WEIGHT) -> torch.Tensor:
    """Instance loss + prior_weight * prior loss, each SD's noise-prediction MSE on its own half of one batch.

    instance_latents (B, 4, h, w) and class_latents (C, 4, h, w) are scaled clean latents; the contexts (B, 77, D)
    and (C, 77, D) their text states. The random numbers come from `generator`: the B + C timesteps first, then the
    noise, for the batch of instance then class latents.
    """
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not prior_weight >= 0:
        raise ValueError(f"prior_weight must be a number >= 0 (lambda of Ruiz et al. eq. 2), got {prior_weight!r}")
    for name, latents, context in (("instance", instance_latents, instance_context),
                                   ("class", class_latents, class_context)):
        if latents.dim() != 4 or context.dim() != 3 or latents.shape[0] != context.shape[0] or not len(latents):
            raise ValueError(f"{name}_latents (N, 4, h, w) and {name}_context (N, 77, D) must hold the same N >= 1 "
                             f"pictures, got {tuple(latents.shape)} and {tuple(context.shape)}")
    if instance_latents.shape[1:] != class_latents.shape[1:] or instance_context.shape[1:] != class_context.shape[1:]:
        raise ValueError(f"the instance and class batches must have the same latent and text shapes, got "
                         f"{tuple(instance_latents.shape)} / {tuple(class_latents.shape)} and "
                         f"{tuple(instance_context.shape)} / {tuple(class_context.shape)}")
    # 1. one batch: the instance pictures, then the class pictures, each with its own prompt's text states
    z0 = torch.cat([instance_latents, class_latents])                        # (B + C, 4, h, w)
    context = torch.cat([instance_context, class_context])                   # (B + C, 77, D)
    # 2. noise it to random timesteps (timesteps first, then the noise), Ho et al. 2020, eq. 4
    t = torch.randint(0, scheduler.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)  # (B + C,)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device)
    z_t = scheduler.add_noise(z0, eps, t)
    # 3. one UNet call, split again: (B + C, ...) -> (B, ...) and (C, ...)
    pred = unet(z_t, context, t).float()
    n = len(instance_latents)
    instance_loss = F.mse_loss(pred[:n], eps[:n])
    prior_loss = F.mse_loss(pred[n:], eps[n:])
    # 4. Ruiz et al. 2023, eq. 2: the instance term plus lambda times the prior term
    return instance_loss + prior_weight * prior_loss
