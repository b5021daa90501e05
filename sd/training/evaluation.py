"""Measured quality of a model trained on the shapes: prompt accuracy, judged by an attribute classifier.

1. An attribute classifier (a small CNN: shape, color, background) is trained on the dataset's ground truth
   and must be at least 99% right on fresh real images before its judgement counts.
2. The model generates images for a fixed prompt set: every held-out combination (never seen in training)
   and as many seen ones; an image is right when its shape, color and background all match the prompt.
3. The same with and without classifier-free guidance; plus the VAE's reconstruction PSNR.
Generation uses the scheduler directly (CLIP -> UNet loop -> VAE decoder), as in the seed's pipeline.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import COLORS, HELD_OUT, SHAPES, ShapesDataset, caption_for, training_combinations
from ..diffusion import DiffusionScheduler

DEFAULT_GUIDANCE = 5.0          # guidance scale of the guided run (small models need less than SD's 7.5)
DEFAULT_STEPS = 25              # DDIM steps
DEFAULT_PER_PROMPT = 8          # images per prompt
CLASSIFIER_MIN_ACCURACY = 0.99  # the judge must be this good on real images, or the evaluation stops
CLASSIFIER_FILE = Path(__file__).parent.parent / "assets" / "attribute_classifier.safetensors"
# Seeds of the classifier's own data, apart from the training data's seed 0.
CLASSIFIER_TRAIN_SEED, CLASSIFIER_TEST_SEED = 101, 102
CLASSIFIER_TRAIN_SIZE, CLASSIFIER_TEST_SIZE = 12_000, 2_000
CLASSIFIER_STEPS, CLASSIFIER_BATCH, CLASSIFIER_LR = 600, 128, 2e-3
BLUR_PROBABILITY = 0.5          # augmentation: generated images are softer than drawn ones
NOISE_STD = 0.05                # augmentation: small pixel noise, in the [-1, 1] range
PSNR_IMAGES = 512


def prompt_set() -> list[tuple[tuple[str, str, str], bool]]:
    """The fixed evaluation prompts as ((shape, color, background), held_out): all 6 held-out, 12 seen."""
    seen = training_combinations()
    step = len(seen) // len(HELD_OUT) // 2           # spread the seen ones over all shapes and colors
    return [(c, True) for c in HELD_OUT] + [(c, False) for c in seen[::step][:2 * len(HELD_OUT)]]


# --- the judge -----------------------------------------------------------------------------------------------------

class AttributeClassifier(nn.Module):
    """A small CNN with three heads: which shape, which color, which background color."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),              # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),      # (B, 2w, H/4, W/4)
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.SiLU(),                   # (B, 4w, H/4, W/4)
        )
        self.shape = nn.Linear(8 * width, len(SHAPES))
        self.color = nn.Linear(8 * width, len(COLORS))
        self.background = nn.Linear(8 * width, len(COLORS))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(image)
        pooled = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)     # (B, 4w) max and mean -> (B, 8w)
        return self.shape(pooled), self.color(pooled), self.background(pooled)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3) indices of shape, color, background."""
        return torch.stack([logits.argmax(dim=1) for logits in self(image.float())], dim=1)


def _augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half the images a little (3x3 box) and add a little noise: the judge should not need crisp pixels."""
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(image.shape[0], 1, 1, 1, generator=generator) < BLUR_PROBABILITY
    image = torch.where(pick, blurred, image)
    return image + NOISE_STD * torch.randn(image.shape, generator=generator)


def train_classifier(steps: int = CLASSIFIER_STEPS, image_size: int = 32, progress: bool = False) -> AttributeClassifier:
    """Train the judge on ground truth (all 90 combinations: it must know the held-out ones too)."""
    from tqdm.auto import tqdm
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


def classifier_accuracy(classifier: AttributeClassifier, image_size: int = 32) -> dict[str, float]:
    """Accuracy of the judge on fresh real images: per attribute and all three at once."""
    data = ShapesDataset(CLASSIFIER_TEST_SIZE, image_size, seed=CLASSIFIER_TEST_SEED, split="all")
    pred = torch.cat([classifier.predict(data.pixels(slice(i, i + 500))) for i in range(0, len(data), 500)])
    right = pred == data.labels                                           # (N, 3)
    return {"shape": right[:, 0].float().mean().item(), "color": right[:, 1].float().mean().item(),
            "background": right[:, 2].float().mean().item(), "all": right.all(1).float().mean().item()}


def load_classifier(path: str | Path = CLASSIFIER_FILE, check: bool = True) -> AttributeClassifier:
    """The shipped judge (trained here if the file is missing), checked >= 99% right on real images."""
    from safetensors.torch import load_file, save_file
    path = Path(path)
    if path.is_file():
        model = AttributeClassifier()
        model.load_state_dict(load_file(str(path)))
        model.eval()
    else:
        model = train_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    if check:
        acc = classifier_accuracy(model)
        if acc["all"] < CLASSIFIER_MIN_ACCURACY:
            raise RuntimeError(f"the attribute classifier is only {acc['all']:.3f} right on real images "
                               f"(needs {CLASSIFIER_MIN_ACCURACY}); delete {path} to retrain it")
    return model


# --- generation and scoring ----------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompts: list[str], num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, sampler: str = "ddim",
             progress: bool = False) -> torch.Tensor:
    """Images (len(prompts), 3, H, W) in [-1, 1] from a loaded model (sd.load_checkpoint), via the scheduler."""
    device, dtype = model.device, model.dtype
    tokens = model.tokenizer(list(prompts)).to(device)
    context = model.clip(tokens).to(dtype)                                  # (B, 77, C)
    uncond = model.clip(model.tokenizer([""]).to(device)).to(dtype)         # (1, 77, C)
    side = model.unet.config.sample_size
    shape = (len(prompts), model.unet.config.in_channels, side, side)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latents = DiffusionScheduler().sample(
        model.unet, context, shape, num_inference_steps=num_inference_steps, sampler=sampler,
        uncond_context=uncond, guidance_scale=guidance_scale, generator=generator, progress=progress)
    return model.decoder(latents.float()).float().clamp(-1, 1).cpu()        # (B, 4, h, w) -> (B, 3, H, W)


def score(classifier: AttributeClassifier, images: torch.Tensor, combos: list[tuple[str, str, str]]) -> torch.Tensor:
    """(N, 3) booleans: is each image's shape, color, background the one its prompt asked for?"""
    want = torch.tensor([[SHAPES.index(s), COLORS.index(c), COLORS.index(b)] for s, c, b in combos])
    return classifier.predict(images) == want


def prompt_accuracy(model, classifier: AttributeClassifier, guidance_scale: float = DEFAULT_GUIDANCE,
                    num_inference_steps: int = DEFAULT_STEPS, per_prompt: int = DEFAULT_PER_PROMPT,
                    seed: int = 0, prompts=None) -> dict:
    """Fraction of images whose shape, color and background all match the prompt: overall, held-out, seen."""
    prompts = prompts or prompt_set()
    combos = [c for c, _ in prompts for _ in range(per_prompt)]
    held = torch.tensor([h for _, h in prompts for _ in range(per_prompt)])
    images = generate(model, [caption_for(*c) for c in combos], num_inference_steps, guidance_scale, seed)
    right = score(classifier, images, combos)                               # (N, 3)
    ok = right.all(1).float()
    return {"accuracy": ok.mean().item(),
            "held_out": ok[held].mean().item() if held.any() else float("nan"),
            "seen": ok[~held].mean().item() if (~held).any() else float("nan"),
            "shape": right[:, 0].float().mean().item(), "color": right[:, 1].float().mean().item(),
            "background": right[:, 2].float().mean().item(), "images": len(combos), "guidance_scale": guidance_scale,
            "steps": num_inference_steps}


def model_psnr(model, image_size: int | None = None) -> float:
    """The VAE's reconstruction PSNR (dB) on fresh real images."""
    from .vae import vae_psnr
    f = model.encoder.config.downsample_factor
    size = image_size or model.unet.config.sample_size * f
    data = ShapesDataset(PSNR_IMAGES, size, seed=CLASSIFIER_TEST_SEED, split="all")
    return vae_psnr(model.encoder, model.decoder, data.pixels(slice(None)))


def evaluate_model(model, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                   per_prompt: int = DEFAULT_PER_PROMPT, seed: int = 0, classifier=None) -> dict:
    """Everything `python -m sd evaluate` prints, as a dict."""
    classifier = classifier or load_classifier()
    return {"classifier_on_real_images": classifier_accuracy(classifier),
            "guided": prompt_accuracy(model, classifier, guidance_scale, num_inference_steps, per_prompt, seed),
            "unguided": prompt_accuracy(model, classifier, 1.0, num_inference_steps, per_prompt, seed),
            "vae_psnr_db": model_psnr(model)}


def format_report(report: dict) -> str:
    """The evaluation as a few readable lines."""
    c = report["classifier_on_real_images"]
    lines = [f"attribute classifier on real images: {c['all']:.3f} (shape {c['shape']:.3f}, color {c['color']:.3f}, "
             f"background {c['background']:.3f})"]
    for name in ("guided", "unguided"):
        r = report[name]
        lines.append(f"prompt accuracy, {name} (scale {r['guidance_scale']:g}, {r['steps']} DDIM steps, "
                     f"{r['images']} images): {r['accuracy']:.3f}  held-out {r['held_out']:.3f}  seen {r['seen']:.3f}"
                     f"  [shape {r['shape']:.3f}, color {r['color']:.3f}, background {r['background']:.3f}]")
    lines.append(f"VAE reconstruction PSNR: {report['vae_psnr_db']:.1f} dB")
    return "\n".join(lines)
