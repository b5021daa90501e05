"""`python -m sd train <stage>` and `python -m sd evaluate`: the training and evaluation commands.

`register(subparsers)` adds both to the main command line (sd/cli/); each sets `run` to its handler.
Data-parallel: `torchrun --nproc_per_node 2 -m sd train all ...` (any torchrun launch works the same).
"""
from __future__ import annotations

import argparse
import json
import time

from . import positive_float, positive_int
from ..validation import resolve_device

STAGE_CHOICES = ("vae", "text", "unet", "all")
# The command that made the shipped model (README); `python -m sd train all` with no options repeats it.
DEFAULT_MINUTES = 48.0
DEFAULT_BATCH = {"vae": 64, "text": 128, "unet": 128}


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train the VAE, text encoder and UNet on the shapes dataset",
                       description="Train SD's models on captioned shapes drawn by code (no download). "
                                   "Stages run in order: vae, text, unet; 'all' runs the three.")
    p.add_argument("stage", choices=STAGE_CHOICES, help="which model to train ('all': the three in order)")
    p.add_argument("--out", default="runs/shapes", metavar="DIR",
                   help="folder for checkpoints, loss plots and model.safetensors (default runs/shapes)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (per stage)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help=f"wall-clock budget; for 'all' shared 30/5/65%% between the stages "
                        f"(default {DEFAULT_MINUTES:g} when --steps is not given)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch size, split over data-parallel processes "
                        f"(default {', '.join(f'{k} {v}' for k, v in DEFAULT_BATCH.items())})")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: per stage)")
    p.add_argument("--image-size", type=positive_int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--dataset-size", type=positive_int, default=20_000, help="number of training images")
    p.add_argument("--preset", default="small", choices=("small", "tiny"), help="model sizes (default small)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data and the training (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps between checkpoints")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process (torch)")
    p.add_argument("--save-all-ranks", action="store_true",
                   help="each process also writes <stage>_rank<r>.safetensors (to check that ranks agree)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)
    return p


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="prompt accuracy of a model on the shapes prompts",
                       description="Generate images for a fixed prompt set (seen and held-out attribute "
                                   "combinations), judge them with an attribute classifier, print the accuracy.")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a model.safetensors (default: the shipped model)")
    p.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--cfg", type=float, default=None, metavar="SCALE",
                   help="guidance scale of the guided run (default 5)")
    p.add_argument("--per-prompt", type=positive_int, default=8, help="images per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.set_defaults(run=run_evaluate)
    return p


def register(subparsers) -> None:
    """Add `train` and `evaluate` to an argparse subparsers object."""
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)


def run_train(args) -> int:
    """Handler of `train`: one stage or all, with a step and/or time budget."""
    import torch

    from ..training import STAGES, TrainOptions, make_dataset, train_stage
    from ..training.stages import BUDGET_SHARE
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = args.minutes if (args.minutes or args.steps) else DEFAULT_MINUTES
    stages = STAGES if args.stage == "all" else (args.stage,)
    resolve_device(args.device)   # a bad --device says so before the dataset is drawn
    dataset = make_dataset(args.image_size, args.dataset_size, args.seed)
    summary, start = {}, time.time()
    for stage in stages:
        share = BUDGET_SHARE[stage] if args.stage == "all" else 1.0
        opts = TrainOptions(out_dir=args.out, steps=args.steps, minutes=None if minutes is None else minutes * share,
                            batch_size=args.batch_size or DEFAULT_BATCH[stage], lr=args.lr, seed=args.seed,
                            resume=args.resume, device=args.device, checkpoint_every=args.checkpoint_every,
                            progress=not args.quiet, save_all_ranks=args.save_all_ranks)
        run = train_stage(stage, opts, args.preset, dataset, args.image_size)
        figures = {"steps": run["steps"], "minutes": round(run["seconds"] / 60, 2),
                   "final_loss": round(sum(run["losses"][-20:]) / max(1, len(run["losses"][-20:])), 5)}
        for key in ("psnr", "retrieval_accuracy"):
            if key in run:
                figures[key] = round(run[key], 4)
        summary[stage] = figures
        if run["rank"] == 0:
            print(f"{stage}: {json.dumps(figures)}", flush=True)
    if run["rank"] == 0:
        print(f"done in {(time.time() - start) / 60:.1f} min; outputs in {args.out}/"
              + (" (model.safetensors loads with sd.load_checkpoint)" if "unet" in stages else ""))
    return 0


def run_evaluate(args) -> int:
    """Handler of `evaluate`: prompt accuracy with and without guidance, and the VAE's PSNR."""
    from ..training.evaluation import DEFAULT_GUIDANCE, evaluate_model, format_report
    import sd
    model = sd.load_checkpoint(args.checkpoint, device=args.device, dtype=None)
    report = evaluate_model(model, num_inference_steps=args.steps,
                            guidance_scale=args.cfg if args.cfg is not None else DEFAULT_GUIDANCE,
                            per_prompt=args.per_prompt, seed=args.seed)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry, `python -m sd.cli.train train ...` (the same as `python -m sd train ...`)."""
    parser = argparse.ArgumentParser(prog="python -m sd.cli.train")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
