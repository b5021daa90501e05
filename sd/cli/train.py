"""`python -m sd train <stage>`: train the VAE, the text encoder and the UNet on the shapes dataset; or the
transformer (`mmdit`, SD3's denoiser in miniature) on a finished model's VAE and text encoder.

Data-parallel: `torchrun --nproc_per_node 2 -m sd train all ...` (any torchrun launch works the same).
Ctrl-C or SIGTERM saves a checkpoint of the current step first; `--resume` continues from it.
"""
from __future__ import annotations

import json
import time

import torch

from ..runtime.device import resolve_device
from ..training.distributed import close_distributed, init_distributed
from ..training.interrupt import sigterm_raises
from ..training.loop import TrainOptions
from ..training.presets import PRESETS
from ..io.checkpoint import DEFAULT_MODEL
from ..training.stages import ALL_STAGES, BATCH_SIZES, BUDGET_SHARE, DEFAULT_DATASET_SIZE, STAGES, make_dataset, \
    train_all, train_stage
from .arguments import add_device_option, positive_float, positive_int, random_seed

# The command that made the shipped model (README); `python -m sd train all` with no options repeats it, and a
# single stage with no options trains for its share of it (vae 14.4, text 2.4, unet 31.2 minutes).
DEFAULT_MINUTES = 48.0
# The transformer's budget without --minutes or --steps: the shipped transformer's (README).
DEFAULT_MMDIT_MINUTES = 30.0
DEFAULT_IMAGE_SIZE = 32
# Losses averaged for the "final_loss" figure: one step's loss is noisy.
FINAL_LOSS_STEPS = 20


def add_parser(sub) -> None:
    """Add `train` to the subcommands."""
    p = sub.add_parser("train", help="train the VAE, text encoder and UNet (or a transformer) on the shapes dataset",
                       description="Train SD's models on captioned shapes drawn by code (no download). "
                                   "Stages run in order: vae, text, unet; 'all' runs the three. By default "
                                   f"'all' takes {DEFAULT_MINUTES:g} minutes (the shipped model's recipe) and a "
                                   f"stage its share: {default_minutes_text()}; --minutes or --steps make it "
                                   "shorter (e.g. --minutes 2). A progress bar shows the time spent and left. "
                                   "'mmdit' trains SD3's transformer in miniature with rectified flow on the frozen "
                                   f"VAE and text encoder of --base (default the shipped model), "
                                   f"{DEFAULT_MMDIT_MINUTES:g} minutes by default.")
    p.add_argument("stage", choices=(*ALL_STAGES, "all"),
                   help="which model to train ('all': vae, text and unet in order; mmdit: the transformer)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="unet and mmdit: take the frozen VAE and text encoder from this model file instead of the "
                        "vae and text checkpoints in --out (mmdit's default: the shipped model)")
    p.add_argument("--out", default="runs/shapes", metavar="DIR",
                   help="folder for checkpoints, loss plots and model.safetensors (default runs/shapes)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (per stage)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help=f"wall-clock budget; for 'all' shared "
                        f"{'/'.join(f'{BUDGET_SHARE[s]:.0%}' for s in STAGES).replace('%', '%%')} between the stages "
                        f"(default when --steps is not given: {DEFAULT_MINUTES:g} for all; "
                        f"{default_minutes_text()})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch size, split over data-parallel processes "
                        f"(default {', '.join(f'{k} {v}' for k, v in BATCH_SIZES.items())})")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: per stage)")
    p.add_argument("--image-size", type=positive_int, default=DEFAULT_IMAGE_SIZE,
                   help=f"image side in pixels (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--dataset-size", type=positive_int, default=DEFAULT_DATASET_SIZE,
                   help=f"number of training images (default {DEFAULT_DATASET_SIZE:,})")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model sizes (default small)")
    p.add_argument("--seed", type=random_seed, default=0,
                   help="random seed of the data and the training, 0 .. 2**64-1 (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue each stage from its checkpoint in --out; a stage without one starts at step 0 "
                        "(and says so); a checkpoint of another stage or preset, or an unreadable one, is refused")
    p.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps between checkpoints")
    add_device_option(p)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process (torch)")
    p.add_argument("--save-all-ranks", action="store_true",
                   help="each process also writes <stage>_rank<r>.safetensors (to check that ranks agree)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_train)


def default_minutes(stage: str) -> float:
    """The time budget of `train <stage>` without --minutes or --steps: the recipe's, or the stage's share of it."""
    if stage == "mmdit":
        return DEFAULT_MMDIT_MINUTES
    return DEFAULT_MINUTES if stage == "all" else DEFAULT_MINUTES * BUDGET_SHARE[stage]


def default_minutes_text() -> str:
    return ", ".join(f"{s} {default_minutes(s):g}" for s in STAGES)


def stage_figures(run: dict) -> dict:
    """The figures printed for a finished stage: steps, minutes, mean final loss, and the stage's own measure."""
    last = run["losses"][-FINAL_LOSS_STEPS:]
    figures = {"steps": run["steps"], "minutes": round(run["seconds"] / 60, 2),
               "final_loss": round(sum(last) / max(1, len(last)), 5)}
    for key in ("psnr", "retrieval_accuracy"):
        if key in run:
            figures[key] = round(run[key], 4)
    return figures


def run_train(args) -> None:
    """Handler of `train`: one stage or all, with a step and/or time budget."""
    # 1. every option is checked before a process group starts or the dataset is drawn
    if args.base is not None and args.stage not in ("unet", "mmdit"):
        raise ValueError(f"--base gives the unet and mmdit stages a finished model's VAE and text encoder; "
                         f"the {args.stage} stage does not take it")
    base = args.base or (DEFAULT_MODEL if args.stage == "mmdit" else None)
    minutes = args.minutes if (args.minutes or args.steps) else default_minutes(args.stage)
    opts = TrainOptions(out_dir=args.out, steps=args.steps, minutes=minutes, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, resume=args.resume, device=args.device,
                        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
                        save_all_ranks=args.save_all_ranks)
    resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    # 2. the process group (under torchrun), then the stages
    rank, _ = init_distributed()

    def report(stage: str, run: dict) -> None:
        if rank == 0:
            print(f"{stage}: {json.dumps(stage_figures(run))}", flush=True)

    start = time.time()
    try:
        with sigterm_raises():
            if args.stage == "all":
                train_all(opts, args.preset, args.image_size, args.dataset_size, report=report)
            else:
                dataset = make_dataset(args.image_size, args.dataset_size, args.seed, progress=opts.progress and rank == 0)
                report(args.stage, train_stage(args.stage, opts, args.preset, dataset, args.image_size, base))
    finally:
        close_distributed()
    if rank == 0:
        print(f"done in {(time.time() - start) / 60:.1f} min; outputs in {args.out}/"
              + (" (model.safetensors loads with sd.load_checkpoint)" if args.stage in ("unet", "mmdit", "all") else ""))
