"""Stage 3: the UNet, trained as SD's: predict the noise added to VAE latents, conditioned on CLIP's text states.

The VAE and the text encoder are frozen, so their outputs never change: the posterior of every image and the
text states of every distinct caption are computed once, before the loop (what large SD runs do too, with
pre-encoded latents). Each step then (Ho et al. 2020, algorithm 1; Rombach et al. 2022, eq. 2):
  z_0 ~ q(z | x) scaled by the latent scale; t ~ U{0, ..., 999}; eps ~ N(0, I)
  z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps          (SD's scaled-linear schedule)
  loss = || eps - eps_theta(z_t, c, t) ||^2, with c the empty caption's states 10% of the time,
so the same UNet also learns the unconditional prediction that classifier-free guidance needs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..clip import CLIP
from ..config import UNetConfig
from ..decoder import VAE_Decoder
from ..diffusion import DiffusionScheduler, diffusion_loss
from ..encoder import VAE_Encoder
from ..io.checkpoint import save_checkpoint
from ..tokenizer import CLIPTokenizer
from ..unet import DiffusionUNET
from .data import ShapesDataset
from .distributed import rank_and_world
from .loop import TrainOptions, batch_indices, device_of, train_loop
from .stage_checkpoint import read_stage

# Classifier-free guidance training: drop the caption 10% of the time (Ho & Salimans 2022, sec. 3.2; SD uses 10%).
CAPTION_DROPOUT = 0.1
ENCODE_BATCH = 256


@torch.no_grad()
def encode_dataset(encoder: VAE_Encoder, dataset: ShapesDataset,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance of every image, each (N, 4, h, w), unscaled."""
    device = device_of(encoder)
    means, logvars = [], []
    starts = range(0, len(dataset), ENCODE_BATCH)
    for i in tqdm(starts, disable=not progress, desc=f"unet: encoding {len(dataset):,} images with the VAE",
                  unit="batch"):
        mean, logvar = encoder.posterior(dataset.pixels(slice(i, i + ENCODE_BATCH)).to(device))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def encode_captions(clip: CLIP, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """CLIP's last hidden states of the captions, (N, 77, width)."""
    device = device_of(clip)
    return torch.cat([clip(tokenizer(captions[i:i + ENCODE_BATCH]).to(device)).float().cpu()
                      for i in range(0, len(captions), ENCODE_BATCH)])


def drop_captions(context: torch.Tensor, empty: torch.Tensor, generator: torch.Generator,
                  p: float = CAPTION_DROPOUT) -> torch.Tensor:
    """Replace each sample's text states (B, T, C) by the empty caption's (1, T, C) with probability p."""
    drop = (torch.rand(context.shape[0], generator=generator) < p).to(context.device)   # (B,)
    return torch.where(drop[:, None, None], empty.to(context.dtype), context)


def train_denoiser(name: str, model: nn.Module, loss_fn, dataset: ShapesDataset, encoder: VAE_Encoder,
                   decoder: VAE_Decoder, clip: CLIP, tokenizer: CLIPTokenizer, opts: TrainOptions) -> dict:
    """Train a denoiser (the UNet, or the transformer of sd/training/mmdit.py) with frozen VAE and text encoder.

    The posteriors and the text states are computed once; each step draws a posterior sample, drops 10% of the
    captions and calls loss_fn(model, z0, context, generator). Writes <out>/<name>.safetensors and
    <out>/model.safetensors (EMA weights of the denoiser, with the VAE and text encoder: `sd.load_checkpoint`).
    """
    rank, _ = rank_and_world()
    for m in (encoder, decoder, clip):
        m.eval().requires_grad_(False)
    means, logvars = encode_dataset(encoder, dataset, progress=opts.progress and rank == 0)
    stds = torch.exp(0.5 * logvars)
    captions = sorted(set(dataset.captions))
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in dataset.captions])
    contexts = encode_captions(clip, tokenizer, captions)                     # (N_captions, 77, C)
    empty = encode_captions(clip, tokenizer, [""])                            # (1, 77, C)
    scale = encoder.config.scaling_factor

    def step_loss(trained, step, generator):
        idx = batch_indices(len(dataset), opts.batch_size, step, opts.seed, *rank_and_world())
        device = device_of(trained)
        noise = torch.randn(means[idx].shape, generator=generator)
        z0 = ((means[idx] + stds[idx] * noise) * scale).to(device)            # a posterior sample, scaled
        context = drop_captions(contexts[caption_index[idx]], empty, generator).to(device)
        return loss_fn(trained, z0, context, generator)

    meta = {name: dataclasses.asdict(model.config)}
    run = train_loop(name, model, step_loss, opts, meta, use_ema=True)
    if rank == 0:
        run["model_path"] = save_checkpoint(Path(opts.out_dir) / "model.safetensors", clip, encoder, decoder,
                                            run["ema"].model, tokenizer)
    return run


def train_unet(dataset: ShapesDataset, unet_config: UNetConfig, encoder: VAE_Encoder, decoder: VAE_Decoder,
               clip: CLIP, tokenizer: CLIPTokenizer, opts: TrainOptions) -> dict:
    """Train the UNet with frozen VAE and text encoder; writes <out>/unet.safetensors and <out>/model.safetensors.

    model.safetensors (EMA weights of the UNet) loads with `sd.load_checkpoint(path)`.
    """
    f = encoder.config.downsample_factor
    unet_config = dataclasses.replace(unet_config, context_dim=clip.config.width,
                                      sample_size=dataset.image_size // f, in_channels=encoder.config.latent_channels,
                                      out_channels=encoder.config.latent_channels)
    scheduler = DiffusionScheduler()
    return train_denoiser("unet", DiffusionUNET(unet_config),
                          lambda model, z0, context, generator: diffusion_loss(model, scheduler, z0, context, generator),
                          dataset, encoder, decoder, clip, tokenizer, opts)


def load_unet(path, ema: bool = True) -> DiffusionUNET:
    """The UNet of a UNet stage checkpoint (its EMA weights by default)."""
    parts, meta = read_stage(path)
    unet = DiffusionUNET(UNetConfig.from_dict(meta["unet"]))
    unet.load_state_dict(parts["ema"] if ema and parts["ema"] else parts["model"])
    return unet.eval()

