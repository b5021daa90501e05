"""`python -m sd generate "a prompt"` and `python -m sd img2img in.png "a prompt"`: images from the loaded model."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from ..controlnet import canny_control_image
from ..io.checkpoint import load_checkpoint
from ..runtime.device import DTYPES, detect_runtime
from ..samplers import LCM_ORIGINAL_STEPS, SAMPLERS, require_sampler
from .arguments import add_device_option, image_count, image_path, image_side, positive_int, random_seed


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="SD v1.x weights: a .safetensors/.ckpt file or a diffusers folder; "
                        "default: the project's small model trained on shapes (see README)")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt: what to steer away from")
    p.add_argument("--steps", type=positive_int, default=50,
                   help=f"denoising steps, 1..1000, 1..{LCM_ORIGINAL_STEPS} with lcm (default 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler (default: the model's own, ddim for SD's UNet, euler for a flow transformer); "
                        "lcm: 2 to 8 steps at --cfg 1 to 2, for weights with an LCM-LoRA fused in (README, "
                        "'Pictures in 4 steps')")
    p.add_argument("--lora", action="append", metavar="PATH",
                   help="a LoRA file (diffusers/PEFT or kohya layout, e.g. an LCM-LoRA) to add to the model; "
                        "repeat for several")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="SCALE",
                   help="strength of every --lora (default 1.0)")
    p.add_argument("--cfg", type=float, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale; <= 1 turns guidance off (default 7.5)")
    p.add_argument("--seed", type=random_seed, default=None,
                   help="random seed, 0 .. 2**64-1: the same seed gives the same image")
    p.add_argument("--num-images", type=image_count, default=1, help="images per prompt, up to 64 (default 1)")
    p.add_argument("--out", type=image_path, default="image.png", metavar="FILE",
                   help="where to save the image (.png, .jpg, ...); several images get _0, _1, ... "
                        "(default image.png)")
    add_device_option(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="number format of the text encoder and UNet (default: float16 on a T4 and on Apple "
                        "Silicon, bfloat16 on newer GPUs, float32 on a CPU); the VAE always decodes in float32")


def add_parser(sub) -> None:
    """Add `generate` (text to image) and `img2img` (image to image) to the subcommands."""
    gen = sub.add_parser("generate", help="text to image",
                         description="Make an image from a text prompt. The default model, the project's small one "
                                     "trained on shapes, draws 32x32 images (e.g. \"a red circle on a blue "
                                     "background\") in a few seconds on a CPU; SD v1.5 (--checkpoint) draws 512x512.")
    gen.add_argument("prompt", help='what to draw, e.g. "a red circle on a blue background"')
    _common_options(gen)
    gen.add_argument("--size", type=image_side, default=None, metavar="PIXELS",
                     help="image width and height, up to 2048, a multiple of what the model needs: 64 for SD v1.5 "
                          "(its VAE shrinks 8x, its UNet 8x), 16 for the small default model (4x and 4x); "
                          "default: the model's native size, 512 for SD v1.5, 32 for the small model")
    gen.add_argument("--height", type=image_side, default=None, help="image height (overrides --size)")
    gen.add_argument("--width", type=image_side, default=None, help="image width (overrides --size)")
    gen.add_argument("--controlnet", action="append", metavar="PATH",
                     help="a ControlNet (diffusers folder or file, or an original ControlNet 1.0/1.1 .pth or "
                          ".safetensors) steering the picture with --control-image; repeat for several")
    gen.add_argument("--control-image", action="append", metavar="FILE",
                     help="the control picture (e.g. edges: sd.controlnet.canny_control_image), one per "
                          "--controlnet; it sets the size unless --size/--height/--width are given")
    gen.add_argument("--control-scale", action="append", type=float, metavar="SCALE",
                     help="how strongly each ControlNet steers, one per --controlnet (default 1.0)")
    gen.add_argument("--canny", action="store_true",
                     help="the control images are photos: use their Canny edges (sd.controlnet.canny_control_image, "
                          "needs scikit-image), for a canny ControlNet")
    gen.set_defaults(handler=run_generate)

    i2i = sub.add_parser("img2img", help="image to image",
                         description="Repaint an image following a prompt (SDEdit): noise it, then denoise.")
    i2i.add_argument("input", help="the starting image (PNG, JPEG, ...)")
    i2i.add_argument("prompt", help="what the result should show")
    _common_options(i2i)
    i2i.add_argument("--strength", type=float, default=0.8,
                     help="how much to repaint, in (0, 1]: 0.3 keeps the layout, 1.0 ignores the input (default 0.8)")
    i2i.add_argument("--size", type=image_side, default=None, metavar="PIXELS",
                     help="resize the input to this square size, up to 2048 (default: keep the input's size)")
    i2i.set_defaults(handler=run_img2img)


def _load(args):
    """The checkpoint on the device, number format and memory savers this machine calls for (sd/runtime/device.py)."""
    runtime = detect_runtime(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else runtime.dtype
    pipe = runtime.apply(load_checkpoint(args.checkpoint, device=runtime.device, dtype=dtype))
    for path in getattr(args, "lora", None) or []:
        pipe.load_lora_weights(path, scale=args.lora_scale)
    for path in getattr(args, "controlnet", None) or []:
        pipe.load_controlnet(path)
    return pipe


def _save(images: list[Image.Image], out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def _generate_and_save(args, **inputs) -> None:
    if args.sampler is not None:
        require_sampler(args.sampler, args.steps)      # the sampler's own step limit, before the model loads
    pipe = _load(args)
    sampler = args.sampler or pipe.default_sampler
    steps_run = []            # counted as they run: image to image runs only the last `strength` of the steps
    start = time.perf_counter()
    images = pipe.generate(args.prompt, args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                           sampler=sampler, seed=args.seed, num_images=args.num_images,
                           callback=lambda step, *state: steps_run.append(step), **inputs)
    seconds = time.perf_counter() - start
    steps = f"{len(steps_run)} {sampler} steps"
    if len(steps_run) != args.steps:
        steps = f"{len(steps_run)} of {args.steps} {sampler} steps (strength {args.strength:g})"
    for path in _save(images, args.out):
        print(f"saved {path} ({images[0].size[0]}x{images[0].size[1]}, {steps}, cfg {args.cfg}, {seconds:.1f} s)")


def run_generate(args) -> None:
    """Handler of `generate`; control images are read before the model is loaded."""
    control = {}
    if args.controlnet or args.control_image or args.canny:
        if not args.controlnet:
            raise ValueError("--control-image and --canny need a ControlNet: --controlnet PATH")
        if len(args.control_image or []) != len(args.controlnet):
            raise ValueError(f"give one --control-image per --controlnet, got {len(args.control_image or [])} "
                             f"for {len(args.controlnet)}")
        scales = args.control_scale or [1.0] * len(args.controlnet)
        pictures = [_read_image(p, "control image") for p in args.control_image]
        control = dict(control_image=[canny_control_image(p) for p in pictures] if args.canny else pictures,
                       controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales)
    _generate_and_save(args, height=args.height or args.size, width=args.width or args.size, **control)


def _read_image(path: str, what: str) -> Image.Image:
    try:
        picture = Image.open(path)
        picture.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None
    return picture


def run_img2img(args) -> None:
    """Handler of `img2img`: the input image is read before the model is loaded."""
    try:
        init = Image.open(args.input)
        init.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the input image {args.input}: {e}") from None
    _generate_and_save(args, init_image=init, strength=args.strength, height=args.size, width=args.size)
