"""The three stages in order, as `python -m sd train all` runs them: VAE, text encoder, UNet, into one folder.

<out>/vae.safetensors, text.safetensors + tokenizer/, unet.safetensors: stage checkpoints (weights, optimizer,
EMA, losses), each with its <stage>_loss.png; <out>/model.safetensors: the finished model for sd.load_checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..runtime.device import resolve_device
from .data import ShapesDataset
from .distributed import rank_and_world
from .loop import TrainOptions
from .presets import get_preset
from .text import load_text_encoder, train_text_encoder
from .unet import train_unet
from .vae import load_vae, train_vae

STAGES = ("vae", "text", "unet")
# How `all` splits a time budget: the VAE's fidelity caps the shapes, the UNet needs the most steps.
BUDGET_SHARE = {"vae": 0.3, "text": 0.05, "unet": 0.65}
# Learning rates (AdamW) that worked for these small models: the autoencoder and CLIP like more than the UNet.
LEARNING_RATES = {"vae": 2e-3, "text": 1e-3, "unet": 1e-3}
# Global batch sizes of the shipped model's run (README); the contrastive loss sees more pairs in a larger batch.
BATCH_SIZES = {"vae": 64, "text": 128, "unet": 128}
DEFAULT_DATASET_SIZE = 20_000


def make_dataset(image_size: int = 32, length: int = DEFAULT_DATASET_SIZE, seed: int = 0,
                 progress: bool = False) -> ShapesDataset:
    """The training split (held-out combinations excluded)."""
    return ShapesDataset(length, image_size=image_size, seed=seed, split="train", progress=progress)


def train_stage(stage: str, opts: TrainOptions, preset: str = "small", dataset: ShapesDataset | None = None,
                image_size: int = 32) -> dict:
    """Run one stage; the text and UNet stages read the earlier stages' checkpoints from opts.out_dir."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (or 'all'), got {stage!r}")
    p = get_preset(preset)
    torch.manual_seed(opts.seed)          # the same initial weights for the same seed (and on every rank)
    opts = dataclasses.replace(opts, lr=opts.lr or LEARNING_RATES[stage],
                               batch_size=opts.batch_size or BATCH_SIZES[stage])
    dataset = dataset or make_dataset(image_size, seed=opts.seed, progress=opts.progress and rank_and_world()[0] == 0)
    out = Path(opts.out_dir)
    if stage == "vae":
        return train_vae(dataset, p.vae, opts)
    if stage == "text":
        return train_text_encoder(dataset, p.clip, p.image_encoder_width, p.embed_dim, p.num_merges, opts)
    encoder, decoder = load_vae(out / "vae.safetensors")
    clip, tokenizer = load_text_encoder(out / "text.safetensors")
    device = resolve_device(opts.device)
    for m in (encoder, decoder, clip):
        m.to(device)
    return train_unet(dataset, p.unet, encoder, decoder, clip, tokenizer, opts)


def train_all(opts: TrainOptions, preset: str = "small", image_size: int = 32,
              dataset_size: int = DEFAULT_DATASET_SIZE,
              report: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """VAE, then text encoder, then UNet; a time budget (opts.minutes) is shared as BUDGET_SHARE says.

    report(stage, run), when given, is called as each stage ends (the command line prints its figures).
    """
    dataset = make_dataset(image_size, dataset_size, opts.seed, progress=opts.progress and rank_and_world()[0] == 0)
    runs = {}
    for stage in STAGES:
        stage_opts = dataclasses.replace(
            opts, minutes=None if opts.minutes is None else opts.minutes * BUDGET_SHARE[stage])
        runs[stage] = train_stage(stage, stage_opts, preset, dataset, image_size)
        if report is not None:
            report(stage, runs[stage])
    return runs
