"""Training a ControlNet for a trained model on the shapes: the shape's mask steers where and how large it is drawn.

The control is each image's mask: white where the shape is, black elsewhere (anti-aliased at the edge, as drawn).
Why the mask and not the outline: at 32 x 32 pixels an outline is one or two pixels wide and carries the same
information as the mask (the inside is what the outline encloses), but the mask gives the conditioning embedding
a whole region to see after its two halvings instead of a thin line; and the mask is what the course's
measurement (IoU of the drawn shape with the control) compares against.

The dataset draws every shape in one flat colour on a flat background, so the mask is recovered exactly from the
picture and its two colours: `image = background + (colour - background) * coverage` (sd/training/data.py `draw`),
solved for the coverage per pixel.

What is trained (Zhang et al. 2023, section 3.2-3.3): only the ControlNet, initialised as a copy of the UNet's
encoder and middle block (`ControlNet.from_unet`) with zero convolutions on its outputs; the UNet, the VAE and the
text encoder stay frozen. The loss is SD's (sd/training/unet.py): eps ~ N(0, I), t ~ U{0..999},
  loss = || eps - eps_theta(z_t, c, t, ControlNet(z_t, c, t, control)) ||^2,
with the caption dropped 10% of the time (the paper drops 50% of the prompts, section 3.3, to make the ControlNet
read the control image more; 10% is the course's UNet setting and is a parameter here).
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..controlnet import ControlInputs, ControlledUNet, ControlNet, ControlNetConfig
from ..diffusion import DiffusionScheduler, diffusion_loss
from ..io.controlnet import save_controlnet
from ..pipeline import StableDiffusion
from ..runtime.device import resolve_device
from ..samplers import randn
from ..validation import MAX_BYTE
from .data import COLORS, PALETTE, ShapesDataset, caption_for
from .loop import TrainOptions, batch_indices, train_loop
from .stage_checkpoint import read_stage
from .unet import CAPTION_DROPOUT, drop_captions, encode_captions, encode_dataset

# Defaults for the shipped small model's ControlNet (benchmarks/train_shapes_controlnet.py uses them).
CONTROLNET_LR = 1e-3            # AdamW; the small UNet was trained at 1e-3 too (stages.LEARNING_RATES)
CONTROLNET_BATCH = 64
STAGE_NAME = "controlnet"       # <out>/controlnet.safetensors: the resumable stage checkpoint
EXPORT_NAME = "shapes_controlnet.safetensors"   # <out>/shapes_controlnet.safetensors: what pipe.load_controlnet reads
# The shipped ControlNet of the shipped small model (benchmarks/train_shapes_controlnet.py --ship), float16.
SHIPPED_CONTROLNET = Path(__file__).resolve().parent.parent / "assets" / "shapes_controlnet.safetensors"
# How the IoU measurement samples: DDIM, 20 steps, guidance 7.5 (generate's default scale)
IOU_STEPS = 20
IOU_GUIDANCE = 7.5


def shape_masks(dataset: ShapesDataset) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1]: how much of each pixel the shape covers, solved from the picture and its two colours.

    Each image is background + (colour - background) * coverage (sd/training/data.py `draw`), so per pixel
    coverage = <image - background, colour - background> / |colour - background|^2 (the two colours always differ).
    """
    palette = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32)           # (6, 3) in 0..255
    fg = palette[dataset.labels[:, 1]][:, :, None, None]                                # (N, 3, 1, 1)
    bg = palette[dataset.labels[:, 2]][:, :, None, None]
    diff = fg - bg
    along = ((dataset.images.float() - bg) * diff).sum(1, keepdim=True)                 # (N, 1, H, W)
    return (along / (diff * diff).sum(1, keepdim=True)).clamp(0, 1)


def mask_to_control(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) masks in [0, 1] -> (B, 3, H, W) control images in [0, 1], white shape on black (as a PNG reads:
    rounded to bytes, so training sees exactly what `generate(control_image=...)` gets from the picture)."""
    return ((mask * MAX_BYTE).round() / MAX_BYTE).expand(-1, 3, -1, -1)


def train_controlnet(pipe: StableDiffusion, dataset: ShapesDataset, opts: TrainOptions,
                     embedding_channels: tuple | None = None, caption_dropout: float = CAPTION_DROPOUT) -> dict:
    """Train a ControlNet for pipe's frozen UNet on the dataset's shape masks; returns train_loop's summary with
    "path": <out>/shapes_controlnet.safetensors (float32, diffusers' names), which `pipe.load_controlnet` reads.

    opts.lr and opts.batch_size default to CONTROLNET_LR and CONTROLNET_BATCH. embedding_channels: the conditioning
    embedding's widths; by default SD's first three (16, 32, 96, 256)[:k], with as many halvings as the VAE has,
    so that the control image is the picture's size. <out>/controlnet.safetensors is the resumable checkpoint.
    """
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset (its masks come from its drawn colours), got "
                        f"{type(dataset).__name__}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption_dropout must be a probability in [0, 1), got {caption_dropout!r}")
    if dataset.image_size != pipe.native_size:
        raise ValueError(f"the dataset's images are {dataset.image_size} pixels, the model's are "
                         f"{pipe.native_size}: make the dataset at the model's size")
    opts = TrainOptions(**{**opts.__dict__, "lr": opts.lr or CONTROLNET_LR,
                           "batch_size": opts.batch_size or CONTROLNET_BATCH})
    device = resolve_device(opts.device)
    if embedding_channels is None:
        halvings = pipe.vae_factor.bit_length() - 1                                  # 4 -> 2, 8 -> 3
        embedding_channels = ControlNetConfig().embedding_channels[:halvings + 1]

    # 1. frozen parts: the UNet in float32 on the training device; the VAE's posteriors and the captions' text
    #    states computed once (they never change), as the UNet's training does
    unet = pipe.unet.to(device, torch.float32).eval().requires_grad_(False)
    encoder = pipe.encoder.to(device, torch.float32).eval()
    clip = pipe.clip.to(device, torch.float32).eval()
    means, logvars = encode_dataset(encoder, dataset, progress=opts.progress)
    stds = torch.exp(0.5 * logvars)
    captions = sorted(set(dataset.captions))
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in dataset.captions])
    contexts = encode_captions(clip, pipe.tokenizer, captions)                # (N_captions, 77, C)
    empty = encode_captions(clip, pipe.tokenizer, [""])                       # (1, 77, C)
    controls = mask_to_control(shape_masks(dataset))                          # (N, 3, H, W) in [0, 1]
    scale = pipe.encoder.config.scaling_factor
    scheduler = DiffusionScheduler()

    # 2. the trainable copy: the UNet's encoder and middle, zero convolutions, a new conditioning embedding
    torch.manual_seed(opts.seed)
    net = ControlNet.from_unet(unet, embedding_channels=tuple(embedding_channels)).float()
    if net.config.hint_factor != pipe.vae_factor:
        raise ValueError(f"embedding_channels {tuple(embedding_channels)} halve the control image "
                         f"{len(embedding_channels) - 1} times; the VAE's factor {pipe.vae_factor} needs "
                         f"{pipe.vae_factor.bit_length() - 1}")
    net.requires_grad_(True)

    def step_loss(model, step, generator):
        idx = batch_indices(len(dataset), opts.batch_size, step, opts.seed)
        noise = torch.randn(means[idx].shape, generator=generator)
        z0 = ((means[idx] + stds[idx] * noise) * scale).to(device)               # a posterior sample, scaled
        context = drop_captions(contexts[caption_index[idx]], empty, generator, caption_dropout).to(device)
        hint = controls[idx].to(device)                                         # (B, 3, H, W)

        def controlled_unet(z_t, c, t):
            down, mid = model(z_t, c, t, hint)                                  # residuals: skips and middle
            return unet(z_t, c, t, down_residuals=down, mid_residual=mid)

        return diffusion_loss(controlled_unet, scheduler, z0, context, generator)

    meta = {STAGE_NAME: net.config.to_dict()}
    run = train_loop(STAGE_NAME, net, step_loss, opts, meta)
    run["path"] = save_controlnet(run["model"], Path(opts.out_dir) / EXPORT_NAME)
    return run


def load_trained_controlnet(path) -> ControlNet:
    """The ControlNet of a stage checkpoint written by train_controlnet (<out>/controlnet.safetensors)."""
    parts, meta = read_stage(path)
    if STAGE_NAME not in meta:
        raise ValueError(f"{path} is not a ControlNet training checkpoint (no '{STAGE_NAME}' config in its metadata)")
    net = ControlNet(ControlNetConfig.from_dict(meta[STAGE_NAME]))
    net.load_state_dict(parts["model"])
    return net.eval()


def export_controlnet(net: ControlNet, path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the ControlNet as one .safetensors file in `dtype` (float16 halves the shipped file)."""
    half = ControlNet(net.config)
    half.load_state_dict(net.state_dict())
    return save_controlnet(half.to(dtype), path)



# --- measuring how well the drawn shape follows the control ---------------------------------------------------------

def drawn_shape(images: torch.Tensor, colour: str, background: str) -> torch.Tensor:
    """(B, 3, H, W) pictures in [0, 1] -> (B, H, W) bool: the pixels nearer (in RGB) the shape's colour than the
    background's. The shapes are flat colours on a flat background, so this splits a picture into shape and rest."""
    fg = torch.tensor(PALETTE[colour], dtype=torch.float32).view(1, 3, 1, 1) / MAX_BYTE
    bg = torch.tensor(PALETTE[background], dtype=torch.float32).view(1, 3, 1, 1) / MAX_BYTE
    pixels = images.float()
    return ((pixels - fg) ** 2).sum(1) < ((pixels - bg) ** 2).sum(1)


def mask_iou(drawn: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bools, two sets of pixels -> (B,) intersection over union (1 when both are empty)."""
    inter = (drawn & wanted).flatten(1).sum(1).float()
    union = (drawn | wanted).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_picture(mask: torch.Tensor) -> Image.Image:
    """A (1, H, W) or (H, W) mask in [0, 1] -> the RGB picture (white shape on black) that generate takes."""
    grey = (mask.reshape(mask.shape[-2:]) * MAX_BYTE).round().to(torch.uint8).numpy()
    return Image.fromarray(grey).convert("RGB")


@torch.no_grad()
def generate_batch(pipe: StableDiffusion, prompts: list[str], seed: int, net: ControlNet | None = None,
                   controls: torch.Tensor | None = None, steps: int = IOU_STEPS,
                   guidance_scale: float = IOU_GUIDANCE) -> torch.Tensor:
    """(N, 3, H, W) pictures in [0, 1], picture i as `pipe.generate(prompts[i], seed=seed, control_image=...)`
    with DDIM would make it, but with one control image per prompt (controls: (N, 3, H, W) in [0, 1]) in one batch:
    generate takes one control image for the whole batch."""
    n = len(prompts)
    shape = (n, pipe.unet.config.in_channels, pipe.native_size // pipe.vae_factor, pipe.native_size // pipe.vae_factor)
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]      # as generate(seed=[seed] * n)
    latents = randn(shape, generators, torch.float32, "cpu").to(pipe.device, pipe.dtype)
    context, uncond = pipe.encode_prompt(prompts), pipe.encode_prompt([""] * n)
    unet = pipe.unet
    if net is not None:
        inputs = ControlInputs([], [1.0], [0.0], [1.0])                        # scale 1 over the whole run
        unet = ControlledUNet(pipe.unet, [net], [controls.to(pipe.device, pipe.dtype)], inputs,
                              pipe.scheduler.timesteps(steps, "ddim"))
    out = pipe.scheduler.sample(unet, context, num_inference_steps=steps, sampler="ddim", uncond_context=uncond,
                                guidance_scale=guidance_scale, generator=generators, latents=latents, progress=False)
    return pipe.decode(out).cpu()


@torch.no_grad()
def iou_with_and_without(pipe: StableDiffusion, net: ControlNet, dataset: ShapesDataset, seeds: list[int],
                         short_prompts: bool = False, steps: int = IOU_STEPS,
                         guidance_scale: float = IOU_GUIDANCE) -> dict[str, torch.Tensor]:
    """IoU of the drawn shape with each item's mask, generated with the item's mask as control and without it,
    from the same noise (same seed). Returns "control" and "none", each (len(seeds), N).

    The prompt is the item's full description (shape, colour, background, size and, for small shapes, position),
    or with short_prompts only shape, colour and background, so that size and place are the control's alone.
    """
    masks = shape_masks(dataset)                                                # (N, 1, H, W)
    wanted = masks[:, 0] > 0.5                                                  # (N, H, W)
    prompts = [caption_for(a.shape, a.color, a.background) if short_prompts else
               caption_for(a.shape, a.color, a.background, a.size, a.position if a.size == "small" else None)
               for a in dataset.attributes]
    results = {"control": [], "none": []}
    for seed in seeds:
        plain = generate_batch(pipe, prompts, seed, steps=steps, guidance_scale=guidance_scale)
        steered = generate_batch(pipe, prompts, seed, net, mask_to_control(masks), steps, guidance_scale)
        for name, images in (("none", plain), ("control", steered)):
            drawn = torch.cat([drawn_shape(img[None], a.color, a.background)
                               for img, a in zip(images, dataset.attributes)])   # (N, H, W)
            results[name].append(mask_iou(drawn, wanted))
    return {k: torch.stack(v) for k, v in results.items()}
