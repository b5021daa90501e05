"""Latent consistency distillation (Luo et al. 2023, "LCM" and "LCM-LoRA"): a few-step student from a trained UNet.

A consistency function f(x_t, t) maps every point of one probability-flow ODE trajectory to the trajectory's
start x_0 (Song et al. 2023). LCM writes it on top of an epsilon-predicting UNet with the boundary conditions
of sd/samplers.py: f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, eps_theta(x_t, t)), so f(x, 0) = x.
Each distillation step (Luo et al. 2023, Algorithm 1; diffusers' train_lcm_distill_lora_sd_wds.py):
  1. a clean latent z_0, one of the 50 DDIM timesteps t_{n+k} (999, 979, ..., 19), noise: x_{t_{n+k}} = q(z_0);
  2. the frozen teacher takes ONE guided DDIM step from t_{n+k} to t_n = t_{n+k} - 20 (k = 20 training steps):
     x_{t_n} = DDIM(x_{t_{n+k}}, eps_uncond + w (eps_cond - eps_uncond));
  3. the student's f at (x_{t_{n+k}}, t_{n+k}) is pulled towards the target's f at (x_{t_n}, t_n), where the
     target network is an exponential moving average of the student and gets no gradient (stop-gradient).
At t_n = 0 the target is x_{t_n} itself (boundary condition): that anchors the chain of jumps to the data.

The student here is an LCM-LoRA on the shipped UNet (Luo et al. 2023b): the UNet stays frozen, and LoRA matrices
on its linear and convolution layers learn the jump. The file loads with `pipe.load_lora_weights(path)`, the way
users load latent-consistency/lcm-lora-sdv1-5, and is sampled with `sampler="lcm"` in 2 to 8 steps at guidance 1
to 2 (the teacher's guidance is distilled into the student). `train_loop` (sd/training/loop.py) runs the steps.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import add_lora, lora_layers
from ..io.safe_read import save_safetensors
from ..samplers import LCM_ORIGINAL_STEPS, consistency_scalings, predict_x0, q_sample
from ..validation import require_int, require_number
from .data import ShapesDataset
from .loop import TrainOptions, batch_indices, device_of, train_loop
from .stage_checkpoint import read_stage
from .stages import make_dataset
from .unet import encode_captions, encode_dataset

# The target network's EMA decay: mu = 0.95 in the LCM distillation scripts (diffusers' train_lcm_distill_sd_wds.py,
# --ema_decay default 0.95), far faster than a weight average for sampling (0.999): the target must follow the student.
TARGET_EMA_DECAY = 0.95
# The teacher's guidance scale s (eps = eps_uncond + s (eps_cond - eps_uncond)), drawn uniformly per sample. LCM's
# scripts draw w in [3, 15] for eps_cond + w (eps_cond - eps_uncond), i.e. s = w + 1 in [4, 16] for SD v1.5; the
# shipped small model is evaluated at s = 5 (sd/training/evaluation.py), so its teacher is asked for s in [3, 7].
GUIDANCE_RANGE = (3.0, 7.0)
# LoRA on every linear and convolution layer of the UNet's blocks, as the LCM-LoRA script adapts (its
# lora_target_modules: to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2,
# conv_shortcut, downsamplers.0.conv, upsamplers.0.conv, time_emb_proj), in this package's module names.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "proj", "out", "conv1", "conv2",
                    "conv_shortcut", "conv", "time_emb_proj")
# Rank of the shipped LCM-LoRA: SD v1.5's was trained at rank 64 on blocks 320-1280 wide; the small UNet's are
# 64-96 wide, so 16 keeps the update well below full rank.
LCM_LORA_RANK = 16
LCM_LR = 1e-3                   # AdamW, peak; the LoRA starts at zero and the UNet is small
LCM_BATCH = 64
LCM_DATASET_SIZE = 5_000        # training-split pictures encoded once with the VAE (the shipped UNet saw 20,000)
LCM_LORA_FILE = Path(__file__).parent.parent / "assets" / "lcm_lora.safetensors"

# loss(student, target, teacher, z0, context, uncond, generator, alphas_cumprod) -> scalar
ConsistencyLoss = Callable[..., torch.Tensor]


def consistency_function(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                         alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat: LCM's parametrisation (Luo et al. 2023, eq. 9); t is (B,)."""
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in consistency_scalings(t.float()))     # (B,) -> (B, 1, 1, 1)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return c_skip * x_t + c_out * predict_x0(x_t, eps, alpha_bar)


def skipping_timesteps(batch: int, num_train_timesteps: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n), each (B,): a random one of LCM's 50 DDIM timesteps (19, 39, ..., 999) and k = 20 below it.

    t_n of the lowest one, 19, is -1: clamped to 0, where the boundary condition makes the target x itself.
    """
    k = num_train_timesteps // LCM_ORIGINAL_STEPS                                 # skip 20 training steps
    index = torch.randint(0, LCM_ORIGINAL_STEPS, (batch,), generator=generator)   # (B,)
    start = (index + 1) * k - 1                                                   # (B,) in 19, 39, ..., 999
    return start, (start - k).clamp(min=0)


@torch.no_grad()
def teacher_ddim_step(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      context: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One guided DDIM step (eta = 0, Song et al. 2021, eq. 12) of the frozen teacher from t to t_prev, all (B,)."""
    eps_cond, eps_uncond = teacher(torch.cat([x_t, x_t]), torch.cat([context, uncond]),
                                   torch.cat([t, t])).chunk(2)                      # (2B, C, h, w) -> two (B, ...)
    eps = eps_uncond + guidance.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)         # classifier-free guidance
    alpha_bar, alpha_bar_prev = alphas_cumprod[t].view(-1, 1, 1, 1), alphas_cumprod[t_prev].view(-1, 1, 1, 1)
    x0 = predict_x0(x_t, eps, alpha_bar)
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps


def consistency_distillation_loss(student: nn.Module, target: nn.Module, teacher: nn.Module, z0: torch.Tensor,
                                  context: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator,
                                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """LCM's loss (Luo et al. 2023, eq. 10, with the squared L2 distance): student at t_{n+k} against the EMA target
    at t_n, one guided DDIM step of the teacher apart. context (B, T, D); uncond (1, T, D), the empty caption."""
    b, device = z0.shape[0], z0.device
    alphas_cumprod = alphas_cumprod.to(device)
    # 1. a noisy latent at t_{n+k}, and the guidance scale of each sample
    t, t_prev = (s.to(device) for s in skipping_timesteps(b, len(alphas_cumprod), generator))
    noise = torch.randn(z0.shape, generator=generator).to(device)
    x_t = q_sample(z0, noise, alphas_cumprod[t].view(-1, 1, 1, 1))
    low, high = GUIDANCE_RANGE
    guidance = (low + (high - low) * torch.rand(b, generator=generator)).to(device)
    # 2. the teacher's one ODE step, then the target's f at t_n (no gradient flows into either)
    with torch.no_grad():
        x_prev = teacher_ddim_step(teacher, x_t, t, t_prev, context, uncond.expand(b, -1, -1), guidance,
                                   alphas_cumprod)
        wanted = consistency_function(x_prev, target(x_prev, context, t_prev), t_prev, alphas_cumprod)
    # 3. the student's f at t_{n+k}
    predicted = consistency_function(x_t, student(x_t, context, t), t, alphas_cumprod)
    return F.mse_loss(predicted.float(), wanted.float())


class ConsistencyDistillation(nn.Module):
    """The trained student and its EMA target in one module, so that train_loop's checkpoints hold both."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.target = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, decay: float = TARGET_EMA_DECAY) -> None:
        """target <- decay * target + (1 - decay) * student (Luo et al. 2023, Algorithm 1's EMA update)."""
        for avg, p in zip(self.target.parameters(), self.student.parameters()):
            avg.lerp_(p.detach(), 1 - decay)


def lcm_lora_student(unet: nn.Module, rank: int = LCM_LORA_RANK) -> nn.Module:
    """A copy of `unet` with a fresh LoRA on every LCM_LORA_TARGETS layer (B = 0: it starts as the teacher)."""
    student = copy.deepcopy(unet)
    add_lora(student, rank, targets=LCM_LORA_TARGETS)                 # freezes the copy, adds trainable A and B
    return student


def save_lcm_lora(student: nn.Module, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the student's LoRA as a file `pipe.load_lora_weights` reads (this package's names, `dtype` matrices)."""
    tensors = {}
    for name, layer in lora_layers(student).items():
        tensors[f"unet.{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu", dtype)
        tensors[f"unet.{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu", dtype)
        tensors[f"unet.{name}.alpha"] = torch.tensor(layer.alpha)
    if not tensors:
        raise ValueError("the student has no LoRA to save (make it with lcm_lora_student)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, {})
    return path


def lcm_lora_from_checkpoint(checkpoint: str | Path, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the student's LoRA of a distillation checkpoint (<out>/lcm.safetensors, e.g. of an interrupted run)
    as a file `pipe.load_lora_weights` reads."""
    parts, _ = read_stage(checkpoint)
    tensors = {}
    for key, value in parts["model"].items():
        module, _, role = key.removeprefix("student.").partition(".lora_")
        if key.startswith("student.") and role in ("A.weight", "B.weight"):
            tensors[f"unet.{module}.lora_{role}"] = value.to(dtype)
            if role == "A.weight":
                tensors[f"unet.{module}.alpha"] = torch.tensor(float(value.shape[0]))   # alpha = rank, as trained
    if not tensors:
        raise ValueError(f"{checkpoint} holds no student LoRA: is it the checkpoint of distill_lcm (lcm.safetensors)?")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, {})
    return path


def distill_lcm(pipe, opts: TrainOptions, rank: int = LCM_LORA_RANK, dataset: ShapesDataset | None = None,
                dataset_size: int = LCM_DATASET_SIZE, loss: ConsistencyLoss = consistency_distillation_loss,
                target_decay: float = TARGET_EMA_DECAY) -> dict:
    """Distil pipe.unet (the teacher, left unchanged) into an LCM-LoRA; writes <out_dir>/lcm.safetensors (the
    stage checkpoint: student and target, optimizer; resumable) and <out_dir>/lcm_lora.safetensors (float16).

    opts.lr and opts.batch_size default to LCM_LR and LCM_BATCH. `loss` may be a learner's own, with the
    signature of consistency_distillation_loss. Returns train_loop's summary plus "student" and "lora_path".
    """
    rank = require_int(rank, "rank", 1)
    target_decay = require_number(target_decay, "target_decay", low=0.0, high=1.0)
    if not callable(loss):
        raise TypeError(f"loss must be callable like consistency_distillation_loss, got {type(loss).__name__}")
    opts = dataclasses.replace(opts, lr=opts.lr or LCM_LR, batch_size=opts.batch_size or LCM_BATCH)
    # 1. the frozen models: the teacher UNet (a copy), the VAE's latents and CLIP's states, computed once
    teacher = copy.deepcopy(pipe.unet).float().eval().requires_grad_(False)
    dataset = dataset or make_dataset(pipe.native_size, dataset_size, seed=opts.seed)
    encoder, clip = pipe.encoder, copy.deepcopy(pipe.clip).float().eval()     # the VAE is float32 already
    means, logvars = encode_dataset(encoder, dataset)
    stds = torch.exp(0.5 * logvars)
    captions = sorted(set(dataset.captions))
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in dataset.captions])
    contexts = encode_captions(clip, pipe.tokenizer, captions)                 # (N_captions, 77, D)
    empty = encode_captions(clip, pipe.tokenizer, [""])                        # (1, 77, D)
    scale = encoder.config.scaling_factor
    alphas_cumprod = pipe.scheduler.alphas_cumprod

    # 2. the student (teacher + LoRA) and its EMA target, trained by train_loop
    torch.manual_seed(opts.seed)          # the LoRA's initial A for this seed
    distillation = ConsistencyDistillation(lcm_lora_student(teacher, rank))

    def step_loss(model, step, generator):
        device = device_of(model)
        teacher.to(device)
        if step > 0:                      # the target follows the student as it was after the last update
            model.update_target(target_decay)
        idx = batch_indices(len(dataset), opts.batch_size, step, opts.seed)
        noise = torch.randn(means[idx].shape, generator=generator)
        z0 = ((means[idx] + stds[idx] * noise) * scale).to(device)                # a posterior sample, scaled
        context = contexts[caption_index[idx]].to(device)
        return loss(model.student, model.target, teacher, z0, context, empty.to(device), generator, alphas_cumprod)

    meta = {"lcm": {"rank": rank, "targets": list(LCM_LORA_TARGETS), "target_decay": target_decay,
                    "guidance_range": list(GUIDANCE_RANGE), "dataset_size": len(dataset)}}
    run = train_loop("lcm", distillation, step_loss, opts, meta)
    run["student"] = distillation.student.eval()
    run["lora_path"] = save_lcm_lora(distillation.student, Path(opts.out_dir) / "lcm_lora.safetensors")
    return run
