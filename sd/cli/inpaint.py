"""`python -m sd inpaint image.png mask.png "a prompt"`: repaint the white part of the mask (sd/editing/inpaint.py).

`add_parser(subparsers)` adds the command to the main command line (sd/cli/); it sets the handler.
"""
from __future__ import annotations

import argparse
import time

from PIL import Image

from .arguments import image_side
from .generate import _common_options, _load, _save


def _open(path: str, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inpaint", help="repaint part of an image",
                       description="Repaint the white part of a mask (black = keep) following a prompt, with any "
                                   "SD v1.x checkpoint (latent blending).")
    p.add_argument("input", help="the image to edit (PNG, JPEG, ...)")
    p.add_argument("mask", help="a black-and-white image of the same size: white = repaint, black = keep")
    p.add_argument("prompt", help="what the repainted part should show")
    _common_options(p)
    p.add_argument("--strength", type=float, default=1.0,
                   help="how much to repaint, in (0, 1]: 1.0 starts the white part from pure noise (default 1.0)")
    p.add_argument("--size", type=image_side, default=None, metavar="PIXELS",
                   help="resize the image and mask to this square size (default: keep the input's size)")
    p.add_argument("--keep-original-pixels", action="store_true",
                   help="paste the original pixels back where the mask is black")
    p.set_defaults(handler=run_inpaint)
    return p


def run_inpaint(args) -> None:
    image, mask = _open(args.input, "input image"), _open(args.mask, "mask")
    pipe = _load(args)
    sampler = args.sampler or pipe.default_sampler
    start = time.perf_counter()
    images = pipe.inpaint(args.prompt, image, mask, args.negative, height=args.size, width=args.size,
                          num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=sampler,
                          strength=args.strength, seed=args.seed, num_images=args.num_images,
                          keep_original_pixels=args.keep_original_pixels)
    seconds = time.perf_counter() - start
    for path in _save(images, args.out):
        print(f"saved {path} ({images[0].size[0]}x{images[0].size[1]}, inpainted, {args.steps} {sampler} steps, "
              f"cfg {args.cfg}, {seconds:.1f} s)")
