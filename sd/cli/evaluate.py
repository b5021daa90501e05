"""`python -m sd evaluate`: the prompt accuracy of a trained shapes model, judged by an attribute classifier."""
from __future__ import annotations

import argparse
import json

from ..io.checkpoint import load_checkpoint
from ..samplers import SAMPLERS
from ..training.evaluation import (DEFAULT_GUIDANCE, DEFAULT_PER_PROMPT, DEFAULT_STEPS, RUN_TITLES, evaluate_model,
                                   format_report, prompt_set, require_runs)
from .arguments import add_device_option, positive_int, random_seed


def add_parser(sub) -> None:
    """Add `evaluate` to the subcommands."""
    p = sub.add_parser("evaluate", help="prompt accuracy of a model on the shapes prompts",
                       description="Generate images for a fixed prompt set (seen and held-out attribute "
                                   "combinations), judge them with an attribute classifier, print the accuracy. "
                                   f"At the defaults: three runs of {len(prompt_set()) * DEFAULT_PER_PROMPT} images "
                                   "(at generate's defaults, guided, unguided), about 4 minutes on 2 CPU cores; "
                                   "--per-prompt 1 draws a quarter of the images. Progress goes to stderr.")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a model.safetensors (default: the shipped model)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help=f"sampling steps of the guided and unguided runs (default {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="sampler of the guided and unguided runs (default: the model's own, ddim for a "
                        "noise-predicting UNet, euler for a flow model)")
    p.add_argument("--runs", type=run_list, default=tuple(RUN_TITLES), metavar="NAMES",
                   help=f"which runs, comma-separated: {', '.join(RUN_TITLES)} (default all three)")
    p.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE, metavar="SCALE",
                   help=f"guidance scale of the guided run (default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--per-prompt", type=positive_int, default=DEFAULT_PER_PROMPT,
                   help=f"images per prompt (default {DEFAULT_PER_PROMPT})")
    p.add_argument("--seed", type=random_seed, default=0, help="noise seed, 0 .. 2**64-1 (default 0)")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars (they go to stderr)")
    p.set_defaults(handler=run_evaluate)


def run_list(text: str) -> tuple[str, ...]:
    """--runs: names separated by commas, e.g. "guided" or "guided,unguided"."""
    try:
        return require_runs(name.strip() for name in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_evaluate(args) -> None:
    """Handler of `evaluate`: prompt accuracy with and without guidance, and the VAE's PSNR."""
    model = load_checkpoint(args.checkpoint, device=args.device, dtype=None)
    report = evaluate_model(model, num_inference_steps=args.steps, guidance_scale=args.cfg,
                            per_prompt=args.per_prompt, seed=args.seed, progress=not args.quiet,
                            sampler=args.sampler, runs=args.runs)
    print(json.dumps(report) if args.json else format_report(report))
