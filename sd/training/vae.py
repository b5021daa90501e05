"""Stage 1: the VAE, a KL autoencoder (Kingma & Welling 2014; Rombach et al. 2022, sec. 3) on the shapes images.

Loss = edge-weighted L1 reconstruction + a tiny KL weight, as SD's autoencoder (kl_weight 1e-6; SD adds LPIPS
and a GAN loss, which shapes this simple do not need). Pixels next to an edge count more: the outline is
what tells a circle from a square, and it is where a small latent loses detail first.
After training, the latent scale is set like SD's 0.18215: 1 / std of the latents, so they have unit variance.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import VAEConfig
from ..decoder import VAE_Decoder
from ..encoder import VAE_Encoder
from .data import ShapesDataset
from .distributed import rank_and_world
from .loop import TrainOptions, batch_indices, device_of, train_loop
from .stage_checkpoint import read_stage

KL_WEIGHT = 1e-6            # SD's autoencoder config (first_stage_config: kl_weight 1e-6)
EDGE_WEIGHT = 4.0           # extra weight on pixels where the image changes (the shape's outline)
SCALE_SAMPLES = 2048        # images used to measure the latent standard deviation
PSNR_BATCH = 128            # images per batch of the PSNR measurement (a progress step every few seconds on a CPU)


class VAE(nn.Module):
    """Encoder and decoder together, so one optimizer and one checkpoint hold both."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.encoder, self.decoder = VAE_Encoder(config), VAE_Decoder(config)

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder.posterior(image)
        z = mean + torch.exp(0.5 * logvar) * noise            # reparameterization trick
        return self.decoder(z * self.encoder.config.scaling_factor), mean, logvar


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): 1 where a pixel differs from a neighbour, else 0."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().amax(1, keepdim=True)
    edges = F.pad(dx, (0, 1)) + F.pad(dx, (1, 0)) + F.pad(dy, (0, 0, 0, 1)) + F.pad(dy, (0, 0, 1, 0))
    return (edges > 0).float()


def vae_loss(reconstruction, image, mean, logvar) -> torch.Tensor:
    """Edge-weighted L1 + KL_WEIGHT * KL(q(z|x) || N(0, I)) per latent element (Kingma & Welling 2014, eq. 10)."""
    weight = 1 + EDGE_WEIGHT * edge_map(image)
    recon = (weight * (reconstruction - image).abs()).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return recon + KL_WEIGHT * kl


def psnr(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), image).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


@torch.no_grad()
def vae_psnr(encoder: VAE_Encoder, decoder: VAE_Decoder, images: torch.Tensor, batch: int = PSNR_BATCH,
             progress: bool = False) -> float:
    """Reconstruction PSNR (dB) of images (N, 3, H, W) in [-1, 1] through the posterior mean."""
    device = next(decoder.parameters()).device
    starts = range(0, len(images), batch)
    bar = tqdm(starts, disable=not progress, desc=f"VAE reconstruction PSNR on {len(images):,} images", unit="batch")
    recon = torch.cat([decoder(encoder(images[i:i + batch].to(device))).float().cpu() for i in bar])
    return psnr(recon, images)


@torch.no_grad()
def latent_scale(encoder: VAE_Encoder, images: torch.Tensor) -> float:
    """1 / std of the unscaled posterior means: SD's scale factor, measured the same way for this VAE."""
    device = next(encoder.parameters()).device
    mean, _ = encoder.posterior(images[:SCALE_SAMPLES].to(device))
    return 1.0 / mean.float().std().item()


def train_vae(dataset: ShapesDataset, config: VAEConfig, opts: TrainOptions) -> dict:
    """Train the VAE on the dataset's images; writes <out>/vae.safetensors. Returns the run with 'psnr' added."""
    vae = VAE(dataclasses.replace(config, scaling_factor=1.0))

    def step_loss(model, step, generator):
        idx = batch_indices(len(dataset), opts.batch_size, step, opts.seed, *rank_and_world())
        image = dataset.pixels(idx).to(device_of(model))
        f = config.downsample_factor
        noise = torch.randn(image.shape[0], config.latent_channels, image.shape[-2] // f, image.shape[-1] // f,
                            generator=generator).to(image.device)
        reconstruction, mean, logvar = model(image, noise)
        return vae_loss(reconstruction, image, mean, logvar)

    held = dataset.pixels(slice(0, SCALE_SAMPLES))

    measured = {}

    def finish(model) -> dict:
        set_scale(model, latent_scale(model.encoder, held))
        measured["scaling_factor"] = model.encoder.config.scaling_factor
        show = opts.progress and rank_and_world()[0] == 0
        measured["psnr"] = vae_psnr(model.encoder, model.decoder, held, progress=show)
        return measured

    meta = {"vae": dataclasses.asdict(vae.encoder.config), "image_size": dataset.image_size}
    run = train_loop("vae", vae, step_loss, opts, meta, finish=finish)
    run.update(measured)          # measured once, after the last step (finish)
    return run


def set_scale(vae: VAE, scale: float) -> None:
    """Set the latent scale factor of both halves (the configs are frozen dataclasses: replace them)."""
    config = dataclasses.replace(vae.encoder.config, scaling_factor=scale)
    vae.encoder.config = vae.decoder.config = config


def load_vae(path) -> tuple[VAE_Encoder, VAE_Decoder]:
    """The encoder and decoder of a VAE stage checkpoint, with the measured latent scale."""
    parts, meta = read_stage(path)
    vae = VAE(VAEConfig.from_dict(meta["vae"]))
    vae.load_state_dict(parts["model"])    # raw weights; the scale below is measured after training
    if "scaling_factor" in meta:
        set_scale(vae, meta["scaling_factor"])
    return vae.encoder.eval(), vae.decoder.eval()
