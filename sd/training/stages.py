"""The three stages in order, as `python -m sd train all` runs them: VAE, text encoder, UNet, into one folder.

<out>/vae.safetensors, text.safetensors + tokenizer/, unet.safetensors: stage checkpoints (weights, optimizer,
EMA, losses), each with its <stage>_loss.png; <out>/model.safetensors: the finished model for sd.load_checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .data import ShapesDataset
from .loop import TrainOptions, pick_device, rank_and_world
from .presets import get_preset
from .text import load_text_encoder, train_text_encoder
from .unet import train_unet
from .vae import load_vae, train_vae

STAGES = ("vae", "text", "unet")
# How `all` splits a time budget: the VAE's fidelity caps the shapes, the UNet needs the most steps.
BUDGET_SHARE = {"vae": 0.3, "text": 0.05, "unet": 0.65}
# Learning rates (AdamW) that worked for these small models: the autoencoder and CLIP like more than the UNet.
LEARNING_RATES = {"vae": 2e-3, "text": 1e-3, "unet": 1e-3}
DEFAULT_DATASET_SIZE = 20_000


def make_dataset(image_size: int = 32, length: int = DEFAULT_DATASET_SIZE, seed: int = 0) -> ShapesDataset:
    """The training split (held-out combinations excluded)."""
    return ShapesDataset(length, image_size=image_size, seed=seed, split="train")


def train_stage(stage: str, opts: TrainOptions, preset: str = "small", dataset: ShapesDataset | None = None,
                image_size: int = 32) -> dict:
    """Run one stage; the text and UNet stages read the earlier stages' checkpoints from opts.out_dir."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (or 'all'), got {stage!r}")
    p = get_preset(preset)
    torch.manual_seed(opts.seed)          # the same initial weights for the same seed (and on every rank)
    if opts.lr is None:
        opts = dataclasses.replace(opts, lr=LEARNING_RATES[stage])
    dataset = dataset or make_dataset(image_size, seed=opts.seed)
    out = Path(opts.out_dir)
    if stage == "vae":
        return train_vae(dataset, p.vae, opts)
    if stage == "text":
        return train_text_encoder(dataset, p.clip, p.image_encoder_width, p.embed_dim, p.num_merges, opts)
    encoder, decoder = load_vae(out / "vae.safetensors")
    clip, tokenizer = load_text_encoder(out / "text.safetensors")
    device = pick_device(opts.device, rank_and_world()[0])
    for m in (encoder, decoder, clip):
        m.to(device)
    return train_unet(dataset, p.unet, encoder, decoder, clip, tokenizer, opts)


def train_all(opts: TrainOptions, preset: str = "small", image_size: int = 32,
              dataset_size: int = DEFAULT_DATASET_SIZE) -> dict[str, dict]:
    """VAE, then text encoder, then UNet; a time budget (opts.minutes) is shared as BUDGET_SHARE says."""
    dataset = make_dataset(image_size, dataset_size, opts.seed)
    runs = {}
    for stage in STAGES:
        stage_opts = dataclasses.replace(
            opts, minutes=None if opts.minutes is None else opts.minutes * BUDGET_SHARE[stage])
        runs[stage] = train_stage(stage, stage_opts, preset, dataset, image_size)
    return runs
