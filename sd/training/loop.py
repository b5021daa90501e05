"""The training loop every stage shares: seed, data parallelism, warmup + cosine learning rate, mixed precision,
EMA, a progress bar with the loss, periodic safetensors checkpoints with resume, and a loss-curve plot.

A stage gives `train_loop` a module holding its trainable models and a `step_loss(model, step, generator)`
that draws its own batch; the loop does the rest. Under `torchrun --nproc_per_node N` every rank runs the
same loop on its own slice of each batch and DistributedDataParallel (PyTorch's engine) averages gradients.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..validation import resolve_device

# Training-state entries in a stage checkpoint, beside the model weights.
METADATA_KEY = "sd_training"
WARMUP_STEPS = 50                  # linear learning-rate warmup (Goyal et al. 2017)
MIN_LR_FRACTION = 0.1              # the cosine schedule ends at 10% of the peak rate (Loshchilov & Hutter 2017)
GRAD_CLIP_NORM = 1.0
EMA_DECAY = 0.999                  # UNet weight averaging, as SD's `use_ema` (there 0.9999 over far longer runs)
EMA_WARMUP = 10                    # decay_t = min(EMA_DECAY, (1 + t) / (EMA_WARMUP + t)), so early averages move fast
SEED_STRIDE = 1_000_003            # a prime to mix (seed, step, rank) into one generator seed


@dataclass
class TrainOptions:
    """How long and how to train one stage."""

    out_dir: str = "runs/shapes"
    steps: int | None = None       # stop after this many optimizer steps ...
    minutes: float | None = None   # ... or after this much wall-clock time (either or both)
    batch_size: int = 64           # global batch: split over the ranks of a data-parallel run
    lr: float | None = None        # peak learning rate; None: the stage's default
    seed: int = 0
    resume: bool = False
    device: str | None = None      # default: CUDA when available, else CPU
    checkpoint_every: int = 200
    progress: bool = True
    save_all_ranks: bool = False   # also write each rank's final weights (to check that ranks agree)

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("give a training length: steps, minutes or both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size!r}")


# --- data parallelism ----------------------------------------------------------------------------------------------

def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when run under torchrun (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pick_device(device: str | None, rank: int = 0) -> torch.device:
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
    return resolve_device(device)


def batch_indices(n: int, global_batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The dataset indices this rank trains on at `step`: a fresh shuffle each epoch, the same on every rank.

    A pure function of the step, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} must be divisible by the number of processes {world}")
    per_epoch = max(1, n // global_batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))
    if global_batch > n:   # tiny datasets: draw with repetition
        order = order.repeat(math.ceil(global_batch / n))
    return order[k * global_batch:(k + 1) * global_batch][rank::world]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random numbers (noise, timesteps, caption dropout) of one step on one rank."""
    return torch.Generator().manual_seed((seed * SEED_STRIDE + step) * 64 + rank)


# --- EMA -----------------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's weights (Polyak averaging); sample with `ema.model`."""

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (EMA_WARMUP + step))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach().to(avg.dtype), 1 - d)        # avg = d * avg + (1 - d) * p
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def save_stage(path: Path, model: nn.Module, meta: dict, optimizer=None, ema: EMA | None = None) -> None:
    """One safetensors file: model.*, ema.* and optim.* tensors; step, losses and configs in the metadata."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    meta = dict(meta)
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            tensors.update({f"optim.{i}.{name}": torch.as_tensor(v) for name, v in s.items()})
        meta["param_groups"] = state["param_groups"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.replace(path)     # never leave a half-written checkpoint behind


def read_stage(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A stage checkpoint -> ({'model': state, 'ema': state, 'optim': flat}, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no stage checkpoint at {path}: train that stage first (python -m sd train ...)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{path.name} is not a training checkpoint of this package (no `{METADATA_KEY}` metadata)")
        parts: dict[str, dict] = {"model": {}, "ema": {}, "optim": {}}
        for k in f.keys():
            group, name = k.split(".", 1)
            parts[group][name] = f.get_tensor(k)
    return parts, json.loads(meta[METADATA_KEY])


def _load_optimizer(optimizer, flat: dict, param_groups: list) -> None:
    state: dict = {}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def plot_losses(losses: list[float], path: Path, title: str) -> Path | None:
    """Save the loss curve (raw and smoothed) as a PNG; returns None when matplotlib is missing."""
    try:
        # a bare Figure, not pyplot: saving a file must not change the backend of a notebook's kernel
        from matplotlib.figure import Figure
    except ImportError:
        return None
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# --- the loop ------------------------------------------------------------------------------------------------------

def learning_rate(base: float, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay from base to MIN_LR_FRACTION * base as progress goes 0 -> 1."""
    if step < WARMUP_STEPS:
        return base * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return base * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def train_loop(name: str, model: nn.Module, step_loss: Callable, opts: TrainOptions, meta: dict,
               use_ema: bool = False, weight_decay: float = 0.0, finish: Callable | None = None) -> dict:
    """Train `model` with step_loss(model, step, generator) -> scalar loss; returns the run's summary.

    Writes <out_dir>/<name>.safetensors every opts.checkpoint_every steps and at the end (rank 0), and
    <name>_loss.png. With opts.resume, continues from that checkpoint. finish(model) -> dict runs after the
    last step and adds its entries to the checkpoint's metadata (e.g. a measured latent scale). The result holds the trained `model`
    (plain, not DDP-wrapped), `ema` (or None), `losses`, `steps`, `seconds`.
    """
    rank, world = distributed()
    device = pick_device(opts.device, rank)
    torch.manual_seed(opts.seed)
    out = Path(opts.out_dir)
    ckpt = out / f"{name}.safetensors"
    model.to(device)
    if opts.lr is None:
        raise ValueError("TrainOptions.lr must be set for train_loop (train_stage fills in each stage's default)")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr,
                                  weight_decay=weight_decay)
    ema = EMA(model) if use_ema else None
    step, losses, seconds_before = 0, [], 0.0
    if opts.resume and ckpt.is_file():
        parts, saved = read_stage(ckpt)
        model.load_state_dict(parts["model"])
        if ema is not None and parts["ema"]:
            ema.model.load_state_dict(parts["ema"])
        if parts["optim"]:
            _load_optimizer(optimizer, parts["optim"], saved["param_groups"])
        step, losses, seconds_before = saved["step"], saved["losses"], saved.get("seconds", 0.0)
        if rank == 0 and opts.progress:
            print(f"resuming {name} from step {step} ({ckpt})")
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = device.type == "cuda"   # mixed precision on GPUs: bfloat16 matmuls, float32 weights
    budget = opts.minutes * 60 if opts.minutes is not None else math.inf
    bar = tqdm(total=opts.steps, initial=step, desc=f"train {name}", disable=not opts.progress or rank > 0)

    def checkpoint(final: bool = False):
        state = {**meta, "stage": name, "step": step, "losses": losses, "seconds": seconds_before + elapsed,
                 "world_size": world, "options": asdict(opts)}
        if rank == 0:
            save_stage(ckpt, model, state, optimizer, ema)
        if final and opts.save_all_ranks:
            save_stage(out / f"{name}_rank{rank}.safetensors", model, state)

    start, elapsed = time.time(), 0.0
    model.train()
    while opts.steps is None or step < opts.steps:
        # every rank must agree on the time (for the stop and the learning rate): take rank 0's clock
        clock = torch.tensor([time.time() - start], dtype=torch.float64)
        if world > 1:
            dist.broadcast(clock, 0)
        elapsed = float(clock)
        if seconds_before + elapsed >= budget:
            break
        progress = max(step / opts.steps if opts.steps else 0.0, (seconds_before + elapsed) / budget)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(opts.lr, step, progress)
        generator = step_generator(opts.seed, step, rank)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = step_loss(trained, step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if step % opts.checkpoint_every == 0:
            checkpoint()
    bar.close()
    elapsed = time.time() - start
    model.eval()
    if finish is not None:
        meta = {**meta, **finish(model)}
    checkpoint(final=True)
    if rank == 0:
        plot_losses(losses, out / f"{name}_loss.png", f"{name}: {step} steps")
    if world > 1:
        dist.barrier()
    return {"model": model, "ema": ema, "losses": losses, "steps": step, "seconds": seconds_before + elapsed,
            "rank": rank, "world": world, "device": device, "checkpoint": ckpt}
