"""Does min-SNR loss weighting (Hang et al. 2023) help notebook 04's little pixel model? (not a test)

    python -m benchmarks.pixel_min_snr                       # 1,250 steps, seeds 0 and 1, one thread
    python -m benchmarks.pixel_min_snr --steps 600 --seeds 0 # a quick look

Trains notebook 04's TinyUNet on its 16 x 16 shapes twice per seed, with the same data, noise and initial weights:
once on L_simple (the notebook's loss) and once with each picture's error weighted by min(SNR(t), gamma) / SNR(t),
gamma = 5 (the paper's weight on the x_0 error, written for an epsilon-predicting model). Same steps, batch, AdamW and EMA as the
notebook. Then it draws SAMPLES pictures from each EMA with the notebook's DDPM sampler (100 steps, the same
noise for both) and prints their Frechet distance to fresh real pictures (FID's formula, Heusel et al. 2017, on
the features of the attribute judge of `python -m sd evaluate` instead of Inception's: pooled features of pictures
upsampled from 16 to 32 pixels, real ones alike; lower is better, and two sets of real pictures give the floor),
plus L_simple on fresh pictures per band of timesteps. The model, loss and sampler are the notebook's own code: the
top-level definitions of solutions/04_pixel_diffusion.ipynb are executed here, nothing else of it.
"""
from __future__ import annotations

import argparse
import ast
import copy
import time
from pathlib import Path

import nbformat
import torch
import torch.nn.functional as F

from sd.diffusion import min_snr_weights
from sd.training.data import ShapesDataset
from sd.training.evaluation import judge_features, load_classifier
from sd.training.frechet import frechet_distance

NOTEBOOK = Path(__file__).resolve().parent.parent / "solutions" / "04_pixel_diffusion.ipynb"
MIN_SNR_GAMMA = 5.0            # Hang et al. 2023, their default
BATCH, LR, EMA_DECAY = 64, 3e-3, 0.99   # the notebook's training settings
SAMPLE_STEPS, SAMPLES = 100, 192
BANDS = 5                      # timestep bands of the held-out loss


def notebook_definitions() -> dict:
    """The notebook's imports, functions, classes and constant assignments (ResBlock, TinyUNet, pixel_loss,
    ddpm_sample, cosine_betas, IMAGE_SIZE, ...), executed; its training, figures and prints are left out."""
    namespace: dict = {"torch": torch}     # the skipped set-up cell imports torch
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.source.lstrip().startswith(("# Set-up", "%")):
            continue
        keep = [node for node in ast.parse(cell.source).body
                if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
                or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                          for t in node.targets))]
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
    return namespace


def min_snr_loss(model, x0, betas, generator, gamma=MIN_SNR_GAMMA):
    """The notebook's L_simple with each picture's squared error weighted by sd.diffusion.min_snr_weights, drawing t
    and the noise from the generator in the same order as the notebook's pixel_loss."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    t = torch.randint(0, len(betas), (x0.shape[0],), generator=generator)          # (B,)
    noise = torch.randn(x0.shape, generator=generator)                              # (B, 3, H, W)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    weight = min_snr_weights(alpha_bar, gamma)[t].view(-1, 1, 1, 1)                 # (B, 1, 1, 1)
    return (weight * (model(x_t, t) - noise) ** 2).mean()


def train(nb: dict, images, betas, loss_fn, steps: int, seed: int):
    torch.manual_seed(seed)
    model = nb["TinyUNet"]()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (BATCH,), generator=generator)]
        loss = loss_fn(model, x0, betas, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - EMA_DECAY)
    return ema.eval()


@torch.no_grad()
def draw(nb: dict, ema, betas, seed: int) -> torch.Tensor:
    size = nb["IMAGE_SIZE"]
    x_T = torch.randn(SAMPLES, 3, size, size, generator=torch.Generator().manual_seed(1000 + seed))
    run = torch.linspace(len(betas) - 1, 0, SAMPLE_STEPS).round().long()
    return nb["ddpm_sample"](ema, x_T, run, betas, torch.Generator().manual_seed(2000 + seed)).clamp(-1, 1)


@torch.no_grad()
def band_losses(ema, betas, test_images) -> list[float]:
    """L_simple of the EMA on fresh pictures, in BANDS equal bands of t (the same noise for every model)."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    generator = torch.Generator().manual_seed(3)
    out = []
    for band in torch.arange(len(betas)).chunk(BANDS):
        t = band[torch.randint(0, len(band), (len(test_images),), generator=generator)]
        noise = torch.randn(test_images.shape, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        out.append(F.mse_loss(ema(a.sqrt() * test_images + (1 - a).sqrt() * noise, t), noise).item())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pixel_min_snr", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1250, help="training steps per run (the notebook's 100 s "
                        "on 2 idle cores gives about 1,250)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    nb = notebook_definitions()
    size = nb["IMAGE_SIZE"]
    data = ShapesDataset(length=8000, image_size=size, seed=0)        # the notebook's training pictures
    large = torch.tensor([a.size == "large" for a in data.attributes])
    images = data.pixels(slice(None))[large]
    test = ShapesDataset(length=2 * SAMPLES * 2 + 200, image_size=size, seed=1)
    test_images = test.pixels(slice(None))[torch.tensor([a.size == "large" for a in test.attributes])]
    betas = nb["cosine_betas"](nb["T"])
    judge = load_classifier()
    real = judge_features(judge, test_images[:SAMPLES])
    floor = frechet_distance(judge_features(judge, test_images[SAMPLES:2 * SAMPLES]), real)

    print(f"{args.steps} steps, batch {BATCH}, lr {LR}, EMA {EMA_DECAY}; {SAMPLES} samples of {SAMPLE_STEPS} DDPM "
          f"steps per run; {args.threads} thread(s)")
    bands = " ".join(f"t<{(k + 1) * len(betas) // BANDS:<4d}" for k in range(BANDS))
    print(f"Frechet distance of {SAMPLES} real pictures to {SAMPLES} others (the floor): {floor:.2f}")
    print(f"{'loss':>16} {'seed':>4} {'FD to real':>10}   L_simple by band: {bands}   time")
    totals: dict[str, list[float]] = {}
    for seed in args.seeds:
        for name, loss_fn in (("L_simple", nb["pixel_loss"]), (f"min-SNR-{MIN_SNR_GAMMA:g}", min_snr_loss)):
            start = time.time()
            ema = train(nb, images, betas, loss_fn, args.steps, seed)
            fd = frechet_distance(judge_features(judge, draw(nb, ema, betas, seed)), real)
            losses = " ".join(f"{v:6.4f}" for v in band_losses(ema, betas, test_images))
            totals.setdefault(name, []).append(fd)
            print(f"{name:>16} {seed:4d} {fd:10.2f}   {'':18}{losses}   {time.time() - start:.0f} s", flush=True)
    for name, rows in totals.items():
        print(f"{name:>16} mean {sum(rows) / len(rows):10.2f}")


if __name__ == "__main__":
    main()
