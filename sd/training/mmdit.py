"""The transformer stage: SD3's recipe in miniature. A multimodal diffusion transformer (sd/mmdit.py) learns the
velocity of the straight path between VAE latents and noise, conditioned on the frozen text encoder's states.

As the UNet stage (sd/training/unet.py), the frozen VAE and text encoder are run once over the data before the loop.
Each step (Esser et al. 2024, sections 2 and 3.1; Lipman et al. 2023; Liu et al. 2023):
  z_0 ~ q(z | x) scaled by the latent scale; t = sigmoid(n), n ~ N(0, 1) (logit-normal); eps ~ N(0, I)
  z_t = (1 - t) z_0 + t eps;   loss = || (eps - z_0) - v_theta(z_t, c, 1000 t) ||^2,
with c the empty caption's states 10% of the time, for classifier-free guidance.
"""
from __future__ import annotations

import dataclasses

import torch

from ..clip import CLIP
from ..config import MMDiTConfig
from ..decoder import VAE_Decoder
from ..encoder import VAE_Encoder
from ..flow_matching import sample_training_times, straight_path, velocity_target
from ..mmdit import MMDiT, TIME_SCALE
from ..tokenizer import CLIPTokenizer
from .data import ShapesDataset
from .loop import TrainOptions
from .stage_checkpoint import read_stage
from .unet import train_denoiser


def flow_loss(model, z0: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SD3's objective on clean latents z0 (B, C, h, w): MSE between the predicted and the true velocity, at
    logit-normal times. The random numbers come from the CPU generator, so a run is the same on any device."""
    t = sample_training_times(z0.shape[0], generator).to(z0.device)           # (B,) in (0, 1)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    pred = model(straight_path(z0, noise, t), context, t * TIME_SCALE).float()
    return torch.mean((pred - velocity_target(z0, noise).float()) ** 2)


def train_mmdit(dataset: ShapesDataset, config: MMDiTConfig, encoder: VAE_Encoder, decoder: VAE_Decoder,
                clip: CLIP, tokenizer: CLIPTokenizer, opts: TrainOptions) -> dict:
    """Train the transformer with frozen VAE and text encoder; writes <out>/mmdit.safetensors (the stage
    checkpoint) and <out>/model.safetensors (EMA weights with the VAE and text encoder: `sd.load_checkpoint`)."""
    f = encoder.config.downsample_factor
    config = dataclasses.replace(config, context_dim=clip.config.width, sample_size=dataset.image_size // f,
                                 in_channels=encoder.config.latent_channels,
                                 out_channels=encoder.config.latent_channels)
    return train_denoiser("mmdit", MMDiT(config), flow_loss, dataset, encoder, decoder, clip, tokenizer, opts)


def load_mmdit(path, ema: bool = True) -> MMDiT:
    """The transformer of a stage checkpoint (its EMA weights by default)."""
    parts, meta = read_stage(path)
    model = MMDiT(MMDiTConfig.from_dict(meta["mmdit"]))
    model.load_state_dict(parts["ema"] if ema and parts["ema"] else parts["model"])
    return model.eval()
