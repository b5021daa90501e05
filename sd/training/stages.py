"""The three stages in order, as `python -m sd train all` runs them: VAE, text encoder, UNet, into one folder;
and the transformer stage (SD3's denoiser in miniature), trained on its own on a finished model's VAE and text encoder.

<out>/vae.safetensors, text.safetensors + tokenizer/, unet.safetensors, mmdit.safetensors: stage checkpoints
(weights, optimizer, EMA, losses), each with its <stage>_loss.png; <out>/model.safetensors: the finished model for
sd.load_checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..io.checkpoint import load_checkpoint
from ..runtime.device import resolve_device
from .data import ShapesDataset
from .distributed import rank_and_world
from .loop import TrainOptions
from .presets import get_preset
from .text import load_text_encoder, train_text_encoder
from .mmdit import train_mmdit
from .unet import train_unet
from .vae import load_vae, train_vae

STAGES = ("vae", "text", "unet")        # what `all` runs, in order
DENOISER_STAGES = ("unet", "mmdit")     # stages that train a denoiser on frozen VAE and text encoder
ALL_STAGES = (*STAGES, "mmdit")
# How `all` splits a time budget: the VAE's fidelity caps the shapes, the UNet needs the most steps.
BUDGET_SHARE = {"vae": 0.3, "text": 0.05, "unet": 0.65}
# Learning rates (AdamW) that worked for these small models: the autoencoder and CLIP like more than the UNet; the
# transformer takes half the UNet's (transformers are usually trained at lower rates: DiT 1e-4, at larger widths).
LEARNING_RATES = {"vae": 2e-3, "text": 1e-3, "unet": 1e-3, "mmdit": 5e-4}
# Global batch sizes of the shipped model's run (README); the contrastive loss sees more pairs in a larger batch.
BATCH_SIZES = {"vae": 64, "text": 128, "unet": 128, "mmdit": 128}
DEFAULT_DATASET_SIZE = 20_000


def make_dataset(image_size: int = 32, length: int = DEFAULT_DATASET_SIZE, seed: int = 0,
                 progress: bool = False) -> ShapesDataset:
    """The training split (held-out combinations excluded)."""
    return ShapesDataset(length, image_size=image_size, seed=seed, split="train", progress=progress)


def frozen_parts(out: Path, base=None) -> tuple:
    """The frozen VAE encoder and decoder, text encoder and tokenizer a denoiser trains on: a finished model's
    (base: a model file, e.g. the shipped one) or the vae and text stage checkpoints in the out folder."""
    if base is not None:
        model = load_checkpoint(base, device="cpu", dtype=torch.float32)
        return model.encoder, model.decoder, model.clip, model.tokenizer
    encoder, decoder = load_vae(out / "vae.safetensors")
    clip, tokenizer = load_text_encoder(out / "text.safetensors")
    return encoder, decoder, clip, tokenizer


def train_stage(stage: str, opts: TrainOptions, preset: str = "small", dataset: ShapesDataset | None = None,
                image_size: int = 32, base=None) -> dict:
    """Run one stage; the text and denoiser stages read the earlier stages' checkpoints from opts.out_dir, or, for a
    denoiser, a finished model's VAE and text encoder (base: its file)."""
    if stage not in ALL_STAGES:
        raise ValueError(f"stage must be one of {ALL_STAGES} (or 'all'), got {stage!r}")
    if base is not None and stage not in DENOISER_STAGES:
        raise ValueError(f"a base model gives the frozen VAE and text encoder of the {' and '.join(DENOISER_STAGES)} "
                         f"stages; the {stage} stage trains its own")
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
    encoder, decoder, clip, tokenizer = frozen_parts(out, base)
    device = resolve_device(opts.device)
    for m in (encoder, decoder, clip):
        m.to(device)
    if stage == "mmdit":
        return train_mmdit(dataset, p.mmdit, encoder, decoder, clip, tokenizer, opts)
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
