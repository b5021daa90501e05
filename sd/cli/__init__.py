"""Command line: `python -m sd generate "a prompt" ...`, `python -m sd img2img in.png "a prompt" ...` (and training).

Every mistake in the arguments ends the program with exit code 2 and one line that says what was expected.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..runtime.device import DTYPES, detect_runtime
from ..samplers import SAMPLERS


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block), exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else one clear line."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0, else one clear line."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="SD v1.x weights: a .safetensors/.ckpt file or a diffusers folder; "
                        "default: the project's small model trained on shapes (see README)")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt: what to steer away from")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps, 1..1000 (default 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler (default ddim)")
    p.add_argument("--cfg", type=float, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale; <= 1 turns guidance off (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same image")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", default="image.png", metavar="FILE",
                   help="where to save the PNG; several images get _0, _1, ... (default image.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="number format of the text encoder and UNet (default: float16 on a T4, bfloat16 on newer "
                        "GPUs, float32 on a CPU); the VAE always decodes in float32")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m sd", description="Stable Diffusion v1.x from scratch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="text to image", description="Make an image from a text prompt.")
    gen.add_argument("prompt", help='what to draw, e.g. "a red circle on a blue background"')
    _common_options(gen)
    gen.add_argument("--size", type=positive_int, default=None, metavar="PIXELS",
                     help="image width and height, a multiple of 64 (default: the model's native size, 512 for SD v1.5)")
    gen.add_argument("--height", type=positive_int, default=None, help="image height (overrides --size)")
    gen.add_argument("--width", type=positive_int, default=None, help="image width (overrides --size)")

    i2i = sub.add_parser("img2img", help="image to image",
                         description="Repaint an image following a prompt (SDEdit): noise it, then denoise.")
    i2i.add_argument("input", help="the starting image (PNG, JPEG, ...)")
    i2i.add_argument("prompt", help="what the result should show")
    _common_options(i2i)
    i2i.add_argument("--strength", type=float, default=0.8,
                     help="how much to repaint, in (0, 1]: 0.3 keeps the layout, 1.0 ignores the input (default 0.8)")
    i2i.add_argument("--size", type=positive_int, default=None, metavar="PIXELS",
                     help="resize the input to this square size (default: keep the input's size)")

    try:
        from .train import register
    except ImportError:
        register = None
    if register is not None:
        register(sub)
    return parser


def _load(args):
    """The checkpoint on the device, number format and memory savers this machine calls for (sd/runtime/device.py)."""
    from ..io.checkpoint import load_checkpoint
    runtime = detect_runtime(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else runtime.dtype
    return runtime.apply(load_checkpoint(args.checkpoint, device=runtime.device, dtype=dtype))


def _save(images, out: str) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
                                           for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def run_generate(args) -> None:
    from PIL import Image
    pipe = _load(args)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, seed=args.seed,
                  num_images=args.num_images)
    start = time.perf_counter()
    if args.command == "img2img":
        try:
            init = Image.open(args.input)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the input image {args.input}: {e}") from None
        images = pipe.generate(args.prompt, args.negative, init_image=init, strength=args.strength,
                               height=args.size, width=args.size, **common)
    else:
        height = args.height or args.size
        width = args.width or args.size
        images = pipe.generate(args.prompt, args.negative, height=height, width=width, **common)
    seconds = time.perf_counter() - start
    for path in _save(images, args.out):
        print(f"saved {path} ({images[0].size[0]}x{images[0].size[1]}, {args.steps} {args.sampler} steps, "
              f"cfg {args.cfg}, {seconds:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = run_generate if args.command in ("generate", "img2img") else getattr(args, "run", None)
    try:
        handler(args)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"python -m sd {args.command}: error: {str(e).splitlines()[0]}\n")
        return 2
    return 0
