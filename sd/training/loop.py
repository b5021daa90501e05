"""The training loop every stage shares: seed, data parallelism, warmup + cosine learning rate, mixed precision,
EMA, a progress bar with the loss, periodic safetensors checkpoints with resume, a checkpoint on Ctrl-C or SIGTERM,
and a loss-curve plot.

A stage gives `train_loop` a module holding its trainable models and a `step_loss(model, step, generator)`
that draws its own batch; the loop does the rest. Under `torchrun --nproc_per_node N` every rank runs the
same loop on its own slice of each batch and DistributedDataParallel (PyTorch's engine) averages gradients.
"""
from __future__ import annotations

import copy
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.device import resolve_device
from .distributed import agree, rank_and_world, wait_for_all
from .interrupt import StopRequests, TrainingInterrupted
from .stage_checkpoint import load_optimizer, read_stage, remove_partial_saves, require_resumable, save_stage

WARMUP_STEPS = 50                  # linear learning-rate warmup (Goyal et al. 2017)
MIN_LR_FRACTION = 0.1              # the cosine schedule ends at 10% of the peak rate (Loshchilov & Hutter 2017)
GRAD_CLIP_NORM = 1.0
EMA_DECAY = 0.999                  # UNet weight averaging, as SD's `use_ema` (there 0.9999 over far longer runs)
EMA_WARMUP = 10                    # decay_t = min(EMA_DECAY, (1 + t) / (EMA_WARMUP + t)), so early averages move fast
SEED_STRIDE = 1_000_003            # a prime to mix (seed, step, rank) into one generator seed
SEED_MODULUS = 2**64               # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# tqdm's bar for a time budget: the share of the budget spent, the time spent and left, then step, loss, lr
TIME_BAR = "{l_bar}{bar}| {elapsed}<{remaining}{postfix}"


@dataclass
class TrainOptions:
    """How long and how to train one stage."""

    out_dir: str = "runs/shapes"
    steps: int | None = None       # stop after this many optimizer steps ...
    minutes: float | None = None   # ... or after this much wall-clock time (either or both)
    batch_size: int | None = None  # global batch, split over the ranks of a data-parallel run; None: the stage's
    lr: float | None = None        # peak learning rate; None: the stage's default (both in stages.py)
    seed: int = 0
    resume: bool = False
    device: str | None = None      # default: CUDA when available, else Apple's MPS, else CPU
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
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")


# --- which data each rank sees ------------------------------------------------------------------------------------

def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_indices(n: int, global_batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The dataset indices this rank trains on at `step`: a fresh shuffle each epoch, the same on every rank.

    A pure function of the step, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} must be divisible by the number of processes {world}")
    per_epoch = max(1, n // global_batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * SEED_STRIDE + epoch) % SEED_MODULUS))
    if global_batch > n:   # tiny datasets: draw with repetition
        order = order.repeat(math.ceil(global_batch / n))
    return order[k * global_batch:(k + 1) * global_batch][rank::world]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random numbers (noise, timesteps, caption dropout) of one step on one rank."""
    return torch.Generator().manual_seed(((seed * SEED_STRIDE + step) * 64 + rank) % SEED_MODULUS)


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


# --- the loss curve ------------------------------------------------------------------------------------------------

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

    Writes <out_dir>/<name>.safetensors every opts.checkpoint_every steps, at the end and when Ctrl-C or SIGTERM
    stops the run (rank 0; then TrainingInterrupted is raised), and <name>_loss.png. With opts.resume, continues
    from that checkpoint, or starts at step 0 (and says so) when there is none. finish(model) -> dict runs after
    the last step and adds its entries to the checkpoint's metadata (e.g. a measured latent scale). The result
    holds the trained `model` (plain, not DDP-wrapped), `ema` (or None), `losses`, `steps`, `seconds`.
    """
    # 1. options first: nothing is moved, read or written for a run that cannot start
    if opts.lr is None or opts.batch_size is None:
        raise ValueError("TrainOptions.lr and batch_size must be set for train_loop (train_stage fills in each "
                         f"stage's defaults), got lr={opts.lr!r}, batch_size={opts.batch_size!r}")
    rank, world = rank_and_world()
    device = resolve_device(opts.device)
    out = Path(opts.out_dir)
    ckpt = out / f"{name}.safetensors"

    # 2. the model, its optimizer and EMA, and the state of an earlier run when resuming
    torch.manual_seed(opts.seed)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr,
                                  weight_decay=weight_decay)
    ema = EMA(model) if use_ema else None
    if rank == 0:
        for path in remove_partial_saves(out, name):
            print(f"removed {path}, left by an interrupted save")
    step, losses, seconds_before = 0, [], 0.0
    if opts.resume and ckpt.is_file():
        parts, saved = read_stage(ckpt)
        require_resumable(ckpt, saved, name, meta)
        model.load_state_dict(parts["model"])
        if ema is not None and parts["ema"]:
            ema.model.load_state_dict(parts["ema"])
        if parts["optim"]:
            load_optimizer(optimizer, parts["optim"], saved["param_groups"])
        step, losses, seconds_before = saved["step"], saved["losses"], saved.get("seconds", 0.0)
        if rank == 0:
            print(f"resuming {name} from step {step} ({ckpt})", flush=True)
    elif opts.resume and rank == 0:
        print(f"--resume: no checkpoint at {ckpt} yet, training {name} from step 0", flush=True)

    def save(path: Path, seconds: float, with_optimizer: bool = True) -> None:
        state = {**meta, "stage": name, "step": step, "losses": losses, "seconds": seconds, "world_size": world,
                 "options": asdict(opts)}
        save_stage(path, model, state, optimizer if with_optimizer else None, ema.model if ema else None)

    # 3. the steps, until the step or time budget is spent or a stop is requested
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = device.type == "cuda"   # mixed precision on GPUs: bfloat16 matmuls, float32 weights
    budget = opts.minutes * 60 if opts.minutes is not None else math.inf
    # the bar counts steps when a step budget is given, else the seconds of the time budget (how far, and how long
    # is left); its postfix has the step, the loss and the learning rate
    by_time = opts.steps is None
    bar = tqdm(total=round(budget) if by_time else opts.steps, initial=round(seconds_before) if by_time else step,
               desc=f"train {name}" + (f" ({opts.minutes:g} min)" if by_time else ""),
               bar_format=TIME_BAR if by_time else None, disable=not opts.progress or rank > 0)
    start = time.time()
    model.train()
    with StopRequests() as stop:
        while opts.steps is None or step < opts.steps:
            # every rank must take the same decisions (stop, learning rate): agree on the clock and the signal
            elapsed, signum = agree(time.time() - start, stop.signum or 0)
            if signum or seconds_before + elapsed >= budget:
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
            bar.update(min(round(seconds_before + time.time() - start), bar.total) - bar.n if by_time else 1)
            bar.set_postfix({"step": step, "loss": f"{losses[-1]:.4f}", "lr": f"{optimizer.param_groups[0]['lr']:.1e}"})
            if step % opts.checkpoint_every == 0 and rank == 0:
                save(ckpt, seconds_before + time.time() - start)
        bar.close()
        seconds = seconds_before + time.time() - start
        if signum:   # 4a. stopped by a signal: save this step (still inside StopRequests, so the save completes)
            if rank == 0:
                save(ckpt, seconds)
            wait_for_all()      # no process exits before rank 0's save is complete
            raise TrainingInterrupted(f"{signal.Signals(int(signum)).name} stopped {name} at step {step}; saved "
                                      f"{ckpt}; continue with --resume", int(signum))

    # 4b. finished: the stage's measurements, the final checkpoint, the loss plot
    model.eval()
    if finish is not None:
        meta = {**meta, **finish(model)}
    if rank == 0:
        save(ckpt, seconds)
        plot_losses(losses, out / f"{name}_loss.png", f"{name}: {step} steps")
    if opts.save_all_ranks:
        save(out / f"{name}_rank{rank}.safetensors", seconds, with_optimizer=False)
    wait_for_all()
    return {"model": model, "ema": ema, "losses": losses, "steps": step, "seconds": seconds,
            "rank": rank, "world": world, "device": device, "checkpoint": ckpt}
