"""Measured quality of a model trained on the shapes: prompt accuracy, judged by an attribute classifier.

1. An attribute classifier (a small CNN: shape, color, background, size, position) is trained on the dataset's
   ground truth and must be at least 99% right on fresh real images, for every attribute, before its
   judgement counts.
2. The model draws a fixed prompt set of full captions ("a small red circle on a blue background in the top
   left"): every held-out (shape, color, background) combination and twice as many seen ones, each in all six
   layouts (large in the centre, small in one of five places). An image is right when all five attributes
   match the prompt (the whole caption); each attribute is counted too, seen and held-out combinations apart.
3. At `generate`'s defaults (50 steps of the model's own sampler, guidance 7.5), at the evaluation's own settings (25 steps,
   guidance 5) and without guidance; plus the VAE's reconstruction PSNR.
Images come from the model's own pipeline (`model.generate`): its scheduler, its memory savers, its settings.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import (ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, Attributes,
                   ShapesDataset, caption_for, draw_with_jitter, training_combinations)
from .frechet import frechet_distance
from .vae import vae_psnr

DEFAULT_GUIDANCE = 5.0          # guidance scale of the evaluation's guided run (small models need less than SD's 7.5)
DEFAULT_STEPS = 25              # sampling steps of the evaluation's own runs
GENERATE_GUIDANCE, GENERATE_STEPS = 7.5, 50   # StableDiffusion.generate's defaults (SD's)
DEFAULT_PER_PROMPT = 4          # images per prompt: 108 prompts, 432 images per run
CLASSIFIER_MIN_ACCURACY = 0.99  # the judge must be this good on real images, per attribute, or the evaluation stops
CLASSIFIER_FILE = Path(__file__).parent.parent / "assets" / "attribute_classifier.safetensors"
# Seeds of the classifier's own data, apart from the training data's seed 0.
CLASSIFIER_TRAIN_SEED, CLASSIFIER_TEST_SEED = 101, 102
CLASSIFIER_TRAIN_SIZE, CLASSIFIER_TEST_SIZE = 12_000, 2_000
# Seed of the real drawings the Fréchet distance compares with (the next seed draws the second set, for its floor).
REAL_SEED = 201
CLASSIFIER_STEPS, CLASSIFIER_BATCH, CLASSIFIER_LR = 1000, 128, 2e-3
CLASSIFIER_EVAL_BATCH = 250     # images per batch when the judge is measured (a progress step every few seconds)
BLUR_PROBABILITY = 0.5          # augmentation: generated images are softer than drawn ones
NOISE_STD = 0.05                # augmentation: small pixel noise, in the [-1, 1] range
PSNR_IMAGES = 512
# The three runs of the evaluation, as the report names them.
RUN_TITLES = {"generate_defaults": "at generate's defaults", "guided": "guided", "unguided": "unguided"}
# The six layouts a full caption can ask for: a large shape sits in the centre, a small one anywhere.
LAYOUTS = (("large", "center"),) + tuple(("small", p) for p in POSITIONS)


def prompt_set() -> list[tuple[tuple[str, str, str, str, str], bool]]:
    """The fixed evaluation prompts as ((shape, color, background, size, position), held_out): the 6 held-out
    combinations and 12 seen ones, each in the six LAYOUTS (108 prompts)."""
    seen = training_combinations()
    step = len(seen) // len(HELD_OUT) // 2           # spread the seen ones over all shapes and colors
    combos = [(c, True) for c in HELD_OUT] + [(c, False) for c in seen[::step][:2 * len(HELD_OUT)]]
    return [((*c, *layout), held) for c, held in combos for layout in LAYOUTS]


def prompt_caption(key: tuple) -> str:
    """The caption of a prompt key: (shape, color, background) or (shape, color, background, size, position);
    a large shape's caption names no place (it is always in the centre)."""
    if len(key) == 3:
        return caption_for(*key)
    shape, color, background, size, position = key
    return caption_for(shape, color, background, size, position if size == "small" else None)


# --- the judge -----------------------------------------------------------------------------------------------------

COORD_CHANNELS = 2             # x and y of each pixel in [-1, 1], appended to the judge's RGB input


def with_coordinates(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 5, H, W): RGB plus each pixel's x and y in [-1, 1] (left and top are -1)."""
    b, _, h, w = image.shape
    y = torch.linspace(-1, 1, h, device=image.device, dtype=image.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    x = torch.linspace(-1, 1, w, device=image.device, dtype=image.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([image, x, y], dim=1)


class AttributeClassifier(nn.Module):
    """A small CNN with five heads, one per attribute (ATTRIBUTE_NAMES); pixel coordinates are appended to
    its input (CoordConv, Liu et al. 2018) so that its pooled features still know where the shape is."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3 + COORD_CHANNELS, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),   # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),      # (B, 2w, H/4, W/4)
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.SiLU(),                   # (B, 4w, H/4, W/4)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(8 * width, len(ATTRIBUTE_VALUES[name]))
                                    for name in ATTRIBUTE_NAMES})

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) in [-1, 1] -> one (B, n_values) logit tensor per attribute, in ATTRIBUTE_NAMES order."""
        h = self.features(with_coordinates(image))
        pooled = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)     # (B, 4w) max and mean -> (B, 8w)
        return tuple(self.heads[name](pooled) for name in ATTRIBUTE_NAMES)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 5) indices of shape, color, background, size, position."""
        return torch.stack([logits.argmax(dim=1) for logits in self(image.float())], dim=1)


# The judge reads 32 x 32 pictures; smaller ones are upsampled (nearest), real and drawn alike.
JUDGE_SIZE = 32
# A picture counts as read with confidence when the judge gives every attribute's top value at least this probability.
CONFIDENT = 0.9


@torch.no_grad()
def judge_features(judge: AttributeClassifier, pictures: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) in [-1, 1] -> (N, D) the judge's pooled features (max and mean over positions), float64."""
    if not isinstance(pictures, torch.Tensor) or pictures.dim() != 4 or pictures.shape[1] != 3:
        shape = tuple(pictures.shape) if isinstance(pictures, torch.Tensor) else type(pictures).__name__
        raise ValueError(f"pictures must be a (N, 3, H, W) tensor in [-1, 1], got {shape}")
    pictures = F.interpolate(pictures.float(), size=JUDGE_SIZE, mode="nearest")
    h = judge.features(with_coordinates(pictures))
    return torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1).double()


@torch.no_grad()
def confident_share(judge: AttributeClassifier, pictures: torch.Tensor, confident: float = CONFIDENT) -> float:
    """The share of (N, 3, h, w) pictures in [-1, 1] that the judge reads with probability >= `confident` on every
    attribute (shape, colour, background, size, position): a picture it can read at all, not one that is right."""
    pictures = F.interpolate(pictures.float(), size=JUDGE_SIZE, mode="nearest")
    sure = torch.ones(len(pictures), dtype=torch.bool, device=pictures.device)
    for logits in judge(pictures):
        sure &= logits.softmax(dim=1).amax(dim=1) >= confident
    return sure.float().mean().item()



def _augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half the images a little (3x3 box) and add a little noise: the judge should not need crisp pixels."""
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(image.shape[0], 1, 1, 1, generator=generator) < BLUR_PROBABILITY
    image = torch.where(pick, blurred, image)
    return image + NOISE_STD * torch.randn(image.shape, generator=generator)


def train_classifier(steps: int = CLASSIFIER_STEPS, image_size: int = 32, progress: bool = False) -> AttributeClassifier:
    """Train the judge on ground truth (all 90 combinations: it must know the held-out ones too)."""
    data = ShapesDataset(CLASSIFIER_TRAIN_SIZE, image_size, seed=CLASSIFIER_TRAIN_SEED, split="all")
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=CLASSIFIER_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps)
    g = torch.Generator().manual_seed(CLASSIFIER_TRAIN_SEED)
    for _ in tqdm(range(steps), disable=not progress, desc="attribute classifier"):
        idx = torch.randint(len(data), (CLASSIFIER_BATCH,), generator=g)
        logits = model(_augment(data.pixels(idx), g))
        loss = sum(F.cross_entropy(lg, data.labels[idx, k]) for k, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def classifier_accuracy(classifier: AttributeClassifier, image_size: int = 32,
                        progress: bool = False) -> dict[str, float]:
    """Accuracy of the judge on fresh real images: per attribute and all five at once."""
    data = ShapesDataset(CLASSIFIER_TEST_SIZE, image_size, seed=CLASSIFIER_TEST_SEED, split="all", progress=progress)
    starts = tqdm(range(0, len(data), CLASSIFIER_EVAL_BATCH), disable=not progress, unit="batch",
                  desc="attribute classifier on real images")
    pred = torch.cat([classifier.predict(data.pixels(slice(i, i + CLASSIFIER_EVAL_BATCH))) for i in starts])
    right = pred == data.labels                                           # (N, 5)
    return {**{name: right[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTE_NAMES)},
            "all": right.all(1).float().mean().item()}


def load_classifier(path: str | Path = CLASSIFIER_FILE, check: bool = True, progress: bool = False) -> AttributeClassifier:
    """The shipped judge (trained here if the file is missing), checked >= 99% right on real images, per attribute."""
    from safetensors.torch import load_file, save_file
    path = Path(path)
    if path.is_file():
        model = AttributeClassifier()
        model.load_state_dict(load_file(str(path)))
        model.eval()
    else:
        say(progress, f"{path} is missing: training the attribute classifier ({CLASSIFIER_STEPS} steps)")
        model = train_classifier(progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    if check:
        say(progress, f"checking the attribute classifier on {CLASSIFIER_TEST_SIZE:,} real images")
        require_reliable_judge(classifier_accuracy(model, progress=progress), path)
    return model


def require_reliable_judge(accuracy: dict[str, float], path: str | Path) -> None:
    """Stop when the judge is less than 99% right about any attribute on real images: its verdicts would not count."""
    worst = min(ATTRIBUTE_NAMES, key=accuracy.get)
    if accuracy[worst] < CLASSIFIER_MIN_ACCURACY:
        raise RuntimeError(f"the attribute classifier is only {accuracy[worst]:.3f} right about {worst} on real "
                           f"images (needs {CLASSIFIER_MIN_ACCURACY} for each attribute); delete {path} to retrain it")


# --- generation and scoring ----------------------------------------------------------------------------------------

def generate(model, prompts: list[str], num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, sampler: str | None = None,
             progress: bool = False) -> torch.Tensor:
    """Images (len(prompts), 3, H, W) in [-1, 1] from a loaded model (sd.load_checkpoint), through its pipeline;
    sampler None: the model's own (DDIM for a noise-predicting UNet, Euler for a flow model)."""
    images = model.generate(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            sampler=sampler, seed=seed, progress=progress, output_type="pt")   # (B, 3, H, W) in [0, 1]
    return images.float().cpu() * 2 - 1


def _want(keys: list[tuple]) -> torch.Tensor:
    """(N, 5) indices the prompts ask for; -1 where a short prompt (shape, color, background) says nothing."""
    rows = []
    for key in keys:
        values = list(key) + [None] * (len(ATTRIBUTE_NAMES) - len(key))
        rows.append([ATTRIBUTE_VALUES[name].index(v) if v is not None else -1
                     for name, v in zip(ATTRIBUTE_NAMES, values)])
    return torch.tensor(rows)


def score(classifier: AttributeClassifier, images: torch.Tensor, keys: list[tuple]) -> torch.Tensor:
    """(N, 5) booleans: is each image's shape, color, background, size, position the one its prompt asked for?
    An attribute a short prompt (shape, color, background) does not mention counts as right."""
    want = _want(keys)
    return (classifier.predict(images) == want) | (want < 0)


def real_pictures(keys: list[tuple], image_size: int, seed: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: a real drawing of each key, jittered as the dataset draws; a short key (shape,
    colour, background) gets the dataset's random size and position."""
    rng = np.random.default_rng(seed)
    pictures = []
    for key in keys:
        shape, color, background, *rest = key
        size = rest[0] if rest else SIZES[rng.integers(len(SIZES))]
        position = rest[1] if len(rest) > 1 else ("center" if size == "large" else
                                                   POSITIONS[rng.integers(len(POSITIONS))])
        pictures.append(draw_with_jitter(Attributes(shape, color, background, size, position), image_size, rng))
    return torch.stack(pictures) * 2 - 1


def _rates(right: torch.Tensor, said: torch.Tensor) -> dict[str, float]:
    """Per attribute (over the prompts that say it) and whole caption, from (N, 5) right and said."""
    out = {"caption": right.all(1).float().mean().item() if len(right) else float("nan")}
    for k, name in enumerate(ATTRIBUTE_NAMES):
        out[name] = right[said[:, k], k].float().mean().item() if said[:, k].any() else float("nan")
    return out


def prompt_accuracy(model, classifier: AttributeClassifier, guidance_scale: float = DEFAULT_GUIDANCE,
                    num_inference_steps: int = DEFAULT_STEPS, per_prompt: int = DEFAULT_PER_PROMPT,
                    seed: int = 0, prompts=None, progress: bool = False, sampler: str | None = None) -> dict:
    """How often the picture shows what the prompt says, judged by the classifier.

    prompts: [(key, held_out)], key (shape, color, background[, size, position]); default prompt_set().
    Returns "accuracy" (whole caption: every attribute the prompt says is right), "held_out", "seen" (the
    same over those combinations), per attribute over all, and "by_split": {"held_out", "seen"} -> per attribute.
    """
    prompts = prompts or prompt_set()
    keys = [key for key, _ in prompts for _ in range(per_prompt)]
    held = torch.tensor([h for _, h in prompts for _ in range(per_prompt)])
    # one batch, as the published figures were made (the noise of image i follows from the seed and i); with
    # progress, the sampler's bar counts its steps
    start = time.perf_counter()
    images = generate(model, [prompt_caption(k) for k in keys], num_inference_steps, guidance_scale, seed,
                      sampler=sampler, progress=progress)
    seconds = time.perf_counter() - start
    right = score(classifier, images, keys)                                 # (N, 5)
    # the Fréchet distance to real pictures of the same captions, and between two real sets (its floor)
    real = judge_features(classifier, real_pictures(keys, images.shape[-1], seed=REAL_SEED))
    other = judge_features(classifier, real_pictures(keys, images.shape[-1], seed=REAL_SEED + 1))
    fd, fd_floor = frechet_distance(judge_features(classifier, images), real), frechet_distance(other, real)
    said = _want(keys) >= 0                                                 # (N, 5)
    overall = _rates(right, said)
    split = {"held_out": _rates(right[held], said[held]), "seen": _rates(right[~held], said[~held])}
    return {"accuracy": overall["caption"], "held_out": split["held_out"]["caption"],
            "seen": split["seen"]["caption"], **{name: overall[name] for name in ATTRIBUTE_NAMES},
            "by_split": split, "images": len(keys), "guidance_scale": guidance_scale, "steps": num_inference_steps,
            "sampler": sampler or model.default_sampler, "seconds_per_image": seconds / len(keys),
            "frechet_distance": fd, "frechet_floor": fd_floor}


def model_psnr(model, image_size: int | None = None, progress: bool = False) -> float:
    """The VAE's reconstruction PSNR (dB) on fresh real images."""
    f = model.encoder.config.downsample_factor
    size = image_size or model.unet.config.sample_size * f
    data = ShapesDataset(PSNR_IMAGES, size, seed=CLASSIFIER_TEST_SEED, split="all")
    return vae_psnr(model.encoder, model.decoder, data.pixels(slice(None)), progress=progress)


def evaluate_model(model, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                   per_prompt: int = DEFAULT_PER_PROMPT, seed: int = 0, classifier=None,
                   generate_defaults: bool = True, progress: bool = False, sampler: str | None = None,
                   runs: tuple[str, ...] | None = None) -> dict:
    """Everything `python -m sd evaluate` prints, as a dict: the judge on real images, the prompt accuracy at
    generate's defaults (50 steps of the model's own sampler, guidance 7.5), at the given settings (sampler, steps,
    scale), and without guidance; the PSNR. runs: which of RUN_TITLES to draw (default all three).

    progress: a line on stderr as each part starts (run k of n, what it draws) and the sampler's progress bar.
    """
    runs = require_runs(runs if runs is not None else tuple(RUN_TITLES) if generate_defaults
                        else ("guided", "unguided"))
    start = time.time()
    settings = {"generate_defaults": (GENERATE_GUIDANCE, GENERATE_STEPS, None),
                "guided": (guidance_scale, num_inference_steps, sampler),
                "unguided": (1.0, num_inference_steps, sampler)}
    shipped = classifier is None
    classifier = classifier or load_classifier(check=False, progress=progress)
    say(progress, f"the attribute classifier on {CLASSIFIER_TEST_SIZE:,} real images")
    report = {"classifier_on_real_images": classifier_accuracy(classifier, progress=progress)}
    if shipped:             # measured once: the same figure checks the shipped judge and goes into the report
        require_reliable_judge(report["classifier_on_real_images"], CLASSIFIER_FILE)
    images = len(prompt_set()) * per_prompt
    for k, name in enumerate(runs, start=1):
        scale, steps, run_sampler = settings[name]
        say(progress, f"[{time.time() - start:4.0f} s] run {k} of {len(runs)}, prompt accuracy {RUN_TITLES[name]}: "
                      f"{images} images, scale {scale:g}, {steps} {run_sampler or model.default_sampler} steps, "
                      "in one batch")
        report[name] = prompt_accuracy(model, classifier, scale, steps, per_prompt, seed, progress=progress,
                                       sampler=run_sampler)
    say(progress, f"[{time.time() - start:4.0f} s] the VAE's reconstruction PSNR")
    report["vae_psnr_db"] = model_psnr(model, progress=progress)
    say(progress, f"[{time.time() - start:4.0f} s] done")
    return report


def require_runs(runs) -> tuple[str, ...]:
    """The evaluation's runs by name: a non-empty selection of RUN_TITLES, each once."""
    runs = tuple(runs)
    unknown = [r for r in runs if r not in RUN_TITLES]
    if not runs or unknown or len(set(runs)) != len(runs):
        raise ValueError(f"runs must name some of {', '.join(RUN_TITLES)}, each once, got {', '.join(runs) or 'none'}")
    return runs


def say(progress: bool, message: str) -> None:
    """A progress line on stderr (stdout keeps the report, e.g. `evaluate --json`)."""
    if progress:
        print(message, file=sys.stderr, flush=True)



def format_report(report: dict) -> str:
    """The evaluation as a few readable lines."""
    c = report["classifier_on_real_images"]
    lines = [f"attribute classifier on real images: {c['all']:.3f} ("
             + ", ".join(f"{name} {c[name]:.3f}" for name in ATTRIBUTE_NAMES) + ")"]
    for name, title in RUN_TITLES.items():
        if name not in report:
            continue
        r = report[name]
        timing = f", {r['seconds_per_image']:.3f} s per image" if "seconds_per_image" in r else ""
        lines.append(f"prompt accuracy {title} (scale {r['guidance_scale']:g}, {r['steps']} {r.get('sampler', 'ddim')} "
                     f"steps, {r['images']} images{timing}): whole caption "
                     f"{r['accuracy']:.3f}  held-out {r['held_out']:.3f}  seen {r['seen']:.3f}")
        if "frechet_distance" in r:
            lines.append(f"    Fréchet distance to real drawings of the same captions (judge's features): "
                         f"{r['frechet_distance']:.0f}  (real against real: {r['frechet_floor']:.0f})")
        for split in ("seen", "held_out"):
            rates = r["by_split"][split]
            lines.append(f"    {split.replace('_', '-'):>8}: " + "  ".join(f"{a} {rates[a]:.3f}" for a in ATTRIBUTE_NAMES))
    lines.append(f"VAE reconstruction PSNR: {report['vae_psnr_db']:.1f} dB")
    return "\n".join(lines)
