"""Flow matching against ε-prediction on notebook 04's pixel model: the same data, budget and initial weights.

    python -m benchmarks.pixel_flow_matching --seeds 0 1          # prints the table (benchmarks/results/...)
    python -m benchmarks.pixel_flow_matching --seeds 0 --save     # also writes the seed's weights to sd/assets/

For each seed, two copies of `sd.pixel_unet.TinyUNet` (notebook 04's model) start from the same weights and see the
same pictures in the same order for the same number of steps: one on 04's L_simple (ε target, cosine schedule), one
on the conditional flow-matching loss with SD3's logit-normal times (velocity target, time fed as 1000 t). Each is
then sampled from the same noise at 1, 2, 4, 8, 16 and 32 steps, deterministically: DDIM (η = 0) on evenly spaced
timesteps for the ε model, Euler on evenly spaced times for the flow. Quality is the Fréchet distance to real
pictures on the attribute judge's features (`sd.training.frechet`; lower is better) and the share of samples the
judge reads with confidence >= 0.9 on every attribute (`confident_share`). The floor (real against real) and pure noise are
printed for scale.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.pixel_min_snr import BATCH, EMA_DECAY, LR
from benchmarks.pixel_min_snr import train as train_like_notebook_04
from sd.flow_matching import flow_matching_loss
from sd.course.checks.pixel import reference_ddpm_sample
from sd.pixel_unet import IMAGE_SIZE, TinyUNet, cosine_alpha_bar, load_pixel_unet, sample_eps_clipped
from sd.training.data import ShapesDataset
from sd.training.evaluation import confident_share, judge_features, load_classifier
from sd.training.frechet import frechet_distance

# notebook 04's schedule (its training settings come with benchmarks.pixel_min_snr.train)
T = 1000
STEP_COUNTS = (1, 2, 4, 8, 16, 32)
SAMPLES = 192
ASSETS = Path(__file__).resolve().parent.parent / "sd" / "assets"
WEIGHT_FILES = {"eps": "pixel_eps_unet.safetensors", "flow": "pixel_flow_unet.safetensors"}


ALPHA_BAR = cosine_alpha_bar()
BETAS = 1 - ALPHA_BAR / torch.cat([torch.ones(1), ALPHA_BAR[:-1]])    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
DDPM_STEPS = 100                                                       # notebook 04's sampling run


def eps_loss(model, x0, generator):
    """Notebook 04's L_simple: t uniform over 0..T-1, then the noise, from the generator."""
    t = torch.randint(0, T, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = ALPHA_BAR[t].view(-1, 1, 1, 1)
    return ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise) ** 2).mean()


def flow_loss(model, x0, generator):
    """The conditional flow-matching loss, SD3's logit-normal times, the time fed to the model as 1000 t."""
    return flow_matching_loss(lambda x, t: model(x, T * t), x0, generator, density="logit_normal")


def train(loss_fn, images, steps: int, seed: int) -> TinyUNet:
    """`steps` AdamW steps from seed's initial weights on seed's order of pictures; returns the EMA weights.
    The min-SNR benchmark's loop (notebook 04's), on the package's TinyUNet and a loss that takes no betas."""
    return train_like_notebook_04({"TinyUNet": TinyUNet}, images, None,
                                  lambda model, x0, _betas, generator: loss_fn(model, x0, generator), steps, seed)


@torch.no_grad()
def sample_eps(model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM from t = T - 1 to a clean estimate: `steps` steps from evenly spaced timesteps.

    The predicted x0 is clipped to [-1, 1] and the noise recomputed from it, as notebook 04's sampler clips and as
    diffusers' DDIMScheduler does by default (clip_sample): at t = 999 the cosine schedule leaves alpha_bar = 2e-9,
    and x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies the model's error by 20,000.
    """
    return sample_eps_clipped(model, noise, steps, ALPHA_BAR)


@torch.no_grad()
def sample_flow(model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler on the flow ODE from t = 1 to 0, `steps` evenly spaced times."""
    times = torch.linspace(1, 0, steps + 1)
    x = noise
    for i in range(steps):
        x = x + (times[i + 1] - times[i]) * model(x, (T * times[i]).expand(x.shape[0]))
    return x.clamp(-1, 1)


def shapes_data(size: int = IMAGE_SIZE):
    """Notebook 04's training pictures (large shapes, dataset seed 0) and unseen test pictures (seed 1)."""
    data = ShapesDataset(length=8000, image_size=size, seed=0)
    images = data.pixels(slice(None))[torch.tensor([a.size == "large" for a in data.attributes])]
    test = ShapesDataset(length=4 * SAMPLES + 200, image_size=size, seed=1)
    test_images = test.pixels(slice(None))[torch.tensor([a.size == "large" for a in test.attributes])]
    return images, test_images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pixel_flow_matching",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1250, help="training steps per model (notebook 04's 100 s on "
                        "2 idle cores gives about 1,250)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write the first seed's weights to sd/assets (float16)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="keep every run's weights here (float16), and evaluate the runs found there instead of "
                             "training them again")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, test_images = shapes_data()
    judge = load_classifier()
    real = judge_features(judge, test_images[:SAMPLES])
    floor = frechet_distance(judge_features(judge, test_images[SAMPLES:2 * SAMPLES]), real)
    pure_noise = torch.randn(SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(99))
    print(f"{args.steps} training steps per model, batch {BATCH}, lr {LR}, EMA {EMA_DECAY}; {SAMPLES} samples per "
          f"point; {args.threads} thread(s)")
    print(f"Frechet distance, real to real: {floor:.0f}; noise to real: "
          f"{frechet_distance(judge_features(judge, pure_noise.clamp(-1, 1)), real):.0f}; judge confident on "
          f"{confident_share(judge, test_images[:SAMPLES]):.2f} of real pictures, "
          f"{confident_share(judge, pure_noise.clamp(-1, 1)):.2f} of noise")
    header = "  ".join(f"{n:>11}" for n in STEP_COUNTS)
    print(f"{'objective':>9} {'seed':>4}  FD (confident share) at {header}   train time")
    for seed in args.seeds:
        noise = torch.randn(SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1000 + seed))
        for name, loss_fn, sampler in (("eps", eps_loss, sample_eps), ("flow", flow_loss, sample_flow)):
            kept = args.weights_dir / f"{name}_seed{seed}.safetensors" if args.weights_dir else None
            start = time.time()
            if kept is not None and kept.exists():
                model = TinyUNet()
                model.load_state_dict({k: v.float() for k, v in load_file(kept).items()})
                model.eval()
                trained = "(loaded)"
            else:
                model = train(loss_fn, images, args.steps, seed)
                trained = f"{time.time() - start:.0f} s"
                state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
                metadata = {"trained_by": f"python -m benchmarks.pixel_flow_matching --steps {args.steps} "
                                          f"--seeds {seed}", "objective": name}
                if kept is not None:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    save_file(state, kept, metadata=metadata)
                if args.save and seed == args.seeds[0]:
                    save_file(state, ASSETS / WEIGHT_FILES[name], metadata=metadata)
            cells = []
            for steps in STEP_COUNTS:
                drawn = sampler(model, noise, steps)
                fd = frechet_distance(judge_features(judge, drawn), real)
                cells.append(f"{fd:6.0f} ({confident_share(judge, drawn):.2f})")
            print(f"{name:>9} {seed:4d}  {'':23}{'  '.join(cells)}   {trained}", flush=True)
            if name == "eps":      # for scale: notebook 04's own sampler, stochastic DDPM in 100 steps
                drawn = reference_ddpm_sample(model, noise, torch.linspace(T - 1, 0, DDPM_STEPS).round().long(),
                                              BETAS, torch.Generator().manual_seed(2000 + seed)).clamp(-1, 1)
                print(f"{'':>9} {'':4}  eps with notebook 04's DDPM sampler, {DDPM_STEPS} steps: FD "
                      f"{frechet_distance(judge_features(judge, drawn), real):.0f} "
                      f"({confident_share(judge, drawn):.2f})", flush=True)


if __name__ == "__main__":
    main()
