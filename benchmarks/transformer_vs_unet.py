"""The transformer (SD3's MMDiT in miniature) against the UNet, trained for the same minutes on the same machine.

    python -m sd train mmdit --minutes 30 --threads 1 --out runs/mmdit
    python -m sd train unet --base sd/assets/default_model.safetensors --minutes 30 --threads 1 --out runs/unet30
    python -m benchmarks.transformer_vs_unet runs/mmdit runs/unet30 runs/unet_shipped=sd/assets/default_model.safetensors

Each RUN is a training folder (its model.safetensors and its stage checkpoint, which records the steps and minutes
trained) or NAME=MODEL_FILE for a model without its folder. Both trainings above start from scratch on the shipped
model's frozen VAE and text encoder, run side by side on one thread each, and stop after the same wall-clock budget.
For every model: the denoiser's parameters; seconds per training step (forward and backward, batch 128) and per
guided sampling step (8 images), the median of 5 after a warm-up, on one thread; the activation memory of each,
counted by benchmarks/memory.py's allocation counter; and `python -m sd evaluate`'s prompt accuracy (whole caption,
held-out and seen combinations) and Fréchet distance on the judge's features, at generate's defaults (50 steps,
guidance 7.5) and at 4, 8 and 25 steps (guidance 5), each with the model's own sampler (DDIM for the UNet, Euler on
the flow for the transformer).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import sd
from benchmarks.memory import LiveBytes
from sd.training.evaluation import DEFAULT_GUIDANCE, GENERATE_GUIDANCE, GENERATE_STEPS, load_classifier, prompt_accuracy
from sd.training.stage_checkpoint import read_stage

TRAIN_BATCH = 128          # the training stages' batch (sd/training/stages.py BATCH_SIZES)
SAMPLE_BATCH = 8           # images per guided sampling step (16 rows with the unconditional ones)
REPEATS = 5
FEW_STEPS = (4, 8, 25)


def load_run(spec: str) -> tuple[str, object, dict]:
    """NAME=FILE or a training folder -> (name, loaded model, {"steps", "minutes"} when the folder tells)."""
    if "=" in spec:
        name, file = spec.split("=", 1)
        return name, sd.load_checkpoint(file, device="cpu"), {}
    folder = Path(spec)
    model = sd.load_checkpoint(folder / "model.safetensors", device="cpu")
    stage = "mmdit" if model.is_flow else "unet"
    _, meta = read_stage(folder / f"{stage}.safetensors")
    return folder.name, model, {"steps": meta["step"], "minutes": meta["seconds"] / 60}


def _median_seconds(fn) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_and_memory(model) -> dict:
    """Seconds and activation bytes of one training step and one guided sampling step, on one CPU thread."""
    net = model.unet
    cfg = net.config
    side = cfg.sample_size
    g = torch.Generator().manual_seed(0)
    z = torch.randn(TRAIN_BATCH, cfg.in_channels, side, side, generator=g)
    context = torch.randn(TRAIN_BATCH, model.clip.config.max_tokens, cfg.context_dim, generator=g)
    t = torch.rand(TRAIN_BATCH, generator=g) * 999

    def train_step():
        net.zero_grad(set_to_none=True)
        with torch.enable_grad():
            net.requires_grad_(True)
            net(z, context, t).square().mean().backward()
        net.requires_grad_(False)

    rows = 2 * SAMPLE_BATCH

    def sample_step():
        with torch.no_grad():
            net(z[:rows], context[:rows], t[:rows])

    figures = {"train_step_s": _median_seconds(train_step), "sample_step_s": _median_seconds(sample_step)}
    for name, fn in (("train_step_mb", train_step), ("sample_step_mb", sample_step)):
        with LiveBytes() as counter:
            fn()
        figures[name] = counter.peak / 1e6
    net.zero_grad(set_to_none=True)
    return figures


def quality(model, judge, per_prompt: int) -> dict:
    settings = [(GENERATE_STEPS, GENERATE_GUIDANCE)] + [(s, DEFAULT_GUIDANCE) for s in FEW_STEPS]
    out = {}
    for steps, scale in settings:
        r = prompt_accuracy(model, judge, scale, steps, per_prompt, seed=0)
        out[(steps, scale)] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="training folders, or NAME=MODEL_FILE")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (108 prompts; default 4)")
    args = p.parse_args()
    torch.set_num_threads(1)
    judge = load_classifier(check=False)
    for spec in args.runs:
        name, model, trained = load_run(spec)
        params = sum(p.numel() for p in model.unet.parameters())
        kind = "transformer (flow)" if model.is_flow else "UNet (noise)"
        how = (f"{trained['steps']} steps in {trained['minutes']:.1f} min" if trained else "trained elsewhere")
        print(f"\n{name}: {kind}, {params / 1e6:.2f} M parameters, {how}", flush=True)
        f = speed_and_memory(model)
        print(f"  training step (batch {TRAIN_BATCH}): {f['train_step_s']:.2f} s, activations {f['train_step_mb']:.0f} MB;"
              f"  guided sampling step ({SAMPLE_BATCH} images): {f['sample_step_s'] * 1000:.0f} ms, "
              f"activations {f['sample_step_mb']:.1f} MB", flush=True)
        for (steps, scale), r in quality(model, judge, args.per_prompt).items():
            print(f"  {steps:>2} {r['sampler']} steps, guidance {scale:g} ({r['images']} images, "
                  f"{r['seconds_per_image'] * 1000:.0f} ms per image): whole caption {r['accuracy']:.3f} "
                  f"(held-out {r['held_out']:.3f}, seen {r['seen']:.3f}); shape {r['shape']:.3f} colour "
                  f"{r['color']:.3f} position {r['position']:.3f}; Fréchet distance {r['frechet_distance']:.0f} "
                  f"(real against real {r['frechet_floor']:.0f})", flush=True)


if __name__ == "__main__":
    main()
