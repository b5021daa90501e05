"""A captioned dataset that needs no download: shapes drawn by code, each with its caption and its true attributes.

Every image is one shape (circle, square or triangle) of one color on a plain background of another color,
large and near the centre or small in one of five places: "a small red circle on a blue background in the
top left". The shapes are drawn from their signed distance functions with one pixel of anti-aliasing, so edges
are smooth at any image size. Everything is deterministic for a seed. `draw` can also make a five-pointed star
(UNSEEN_SHAPES), which the dataset never holds: notebook 12 teaches it to the trained model.

A few (shape, color, background) combinations are held out: the training split never contains them, so the
evaluation can ask whether a model composes attributes it only saw apart.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

SHAPES = ("circle", "square", "triangle")
# Drawn by the same code but never in the dataset, its captions or the shipped model's training: notebook 12
# teaches it to the trained model (textual inversion, LoRA).
UNSEEN_SHAPES = ("star",)
# RGB in 0..255; every color can be the shape's or the background's (never both at once).
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")

# (shape, color, background) combinations never seen in training; each attribute, and each pair but one,
# still appears in other combinations.
HELD_OUT = (
    ("circle", "green", "black"),
    ("square", "yellow", "blue"),
    ("triangle", "red", "white"),
    ("circle", "blue", "yellow"),
    ("square", "white", "red"),
    ("triangle", "black", "green"),
)

# Geometry on a 32-pixel canvas, scaled with the image size. Radii are of the circle; squares and triangles
# get the same area-ish footprint through SHAPE_SCALE.
REFERENCE_SIZE = 32
LARGE_RADIUS = (9.0, 11.0)       # big, clear shapes survive the 4x-8x VAE compression best
SMALL_RADIUS = (5.5, 6.5)
CORNER_OFFSET = 7.5              # small shapes sit this far from the centre along x and y
JITTER = 1.5                     # random shift of the centre, pixels
SQUARE_SCALE = 0.89              # half side of a square of about a circle's area: sqrt(pi)/2
TRIANGLE_SCALE = 1.15            # half side of the equilateral triangle (sqrt(pi/sqrt(3)) = 1.35 would crowd)
STAR_SCALE = 1.25                # tip radius of the five-pointed star: its thin points need more room
STAR_INNER = 0.5                 # the star's dents at this fraction of its tip radius (Quilez's rf)
# Caption parts that are sometimes left out, so short prompts ("a red circle on a blue background") are seen.
# Position words are kept more often than not: only small shapes have them, and a caption without them
# teaches nothing about where to draw (at 0.5, only a quarter of all captions said where).
P_SIZE_WORD = 0.5
P_POSITION_WORDS = 0.75
OFFSETS = {"center": (0, 0), "top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1)}


# The five attributes in the order of a label row; shape, color and background are always in the caption.
ATTRIBUTE_NAMES = ("shape", "color", "background", "size", "position")
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": COLORS, "background": COLORS, "size": SIZES, "position": POSITIONS}
NOT_SAID = -1                    # label of an attribute the caption leaves out


@dataclass(frozen=True)
class Attributes:
    """The ground truth of one image."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def label(self) -> list[int]:
        """Indices of the five attributes into ATTRIBUTE_VALUES, in ATTRIBUTE_NAMES order."""
        return [ATTRIBUTE_VALUES[name].index(getattr(self, name)) for name in ATTRIBUTE_NAMES]


def caption_for(shape: str, color: str, background: str, size: str | None = None, position: str | None = None) -> str:
    """The caption of a combination: 'a [small] red circle on a blue background[ in the top left]'."""
    words = ["a"] + ([size] if size else []) + [color, shape, "on a", background, "background"]
    if position:
        words += ["in the", position]
    return " ".join(words)


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, color, background) with color != background: 3 x 6 x 5 = 90."""
    return [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if c != b]


def training_combinations() -> list[tuple[str, str, str]]:
    """The combinations the training split draws from: all but HELD_OUT."""
    return [combo for combo in all_combinations() if combo not in HELD_OUT]


def _signed_distance(shape: str, x: torch.Tensor, y: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance (pixels, negative inside) from each (x, y), relative to the shape's centre."""
    if shape == "circle":
        return torch.sqrt(x ** 2 + y ** 2) - radius
    if shape == "square":
        # box SDF: outside distance plus the (negative) inside distance
        half = radius * SQUARE_SCALE
        qx, qy = x.abs() - half, y.abs() - half
        outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
        return outside + torch.maximum(qx, qy).clamp(max=0)
    if shape == "triangle":
        # equilateral triangle pointing up, centred on its centroid (after Inigo Quilez's sdEquilateralTriangle)
        r, k = radius * TRIANGLE_SCALE, math.sqrt(3.0)
        px, py = x.abs() - r, -y + r / k          # image y grows downwards: flip it so the tip points up
        fold = px + k * py > 0
        px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
        px = px - px.clamp(-2 * r, 0)
        return -torch.sqrt(px ** 2 + py ** 2) * torch.sign(py)
    if shape == "star":
        return _star_distance(x, -y, radius * STAR_SCALE)   # flip y: one point straight up
    raise ValueError(f"shape must be one of {SHAPES + UNSEEN_SHAPES}, got {shape!r}")


def _star_distance(x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Five-pointed star, tips at radius r, one pointing to +y (after Inigo Quilez's sdStar5)."""
    k1x, k1y = math.cos(math.pi / 5), -math.sin(math.pi / 5)          # mirror axes of the star's symmetry
    x = x.abs()
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):                          # fold the plane into one tenth of the star
        d = (kx * x + ky * y).clamp(min=0)
        x, y = x - 2 * d * kx, y - 2 * d * ky
    x, y = x.abs(), y - r
    bax, bay = -STAR_INNER * k1y, STAR_INNER * k1x - 1                # the edge from the tip towards the dent
    h = ((x * bax + y * bay) / (bax ** 2 + bay ** 2)).clamp(0, r)
    return torch.sqrt((x - bax * h) ** 2 + (y - bay * h) ** 2) * torch.sign(y * bax - x * bay)


def draw(attributes: Attributes, image_size: int = REFERENCE_SIZE, radius: float | None = None,
         center: tuple[float, float] | None = None) -> torch.Tensor:
    """Draw one image as a (3, H, W) float tensor in [0, 1], edges anti-aliased over one pixel."""
    scale = image_size / REFERENCE_SIZE
    if radius is None:
        radius = sum(LARGE_RADIUS if attributes.size == "large" else SMALL_RADIUS) / 2
    if center is None:
        dx, dy = OFFSETS[attributes.position]
        center = (image_size / 2 + dx * CORNER_OFFSET * scale, image_size / 2 + dy * CORNER_OFFSET * scale)
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5          # pixel centres
    y, x = torch.meshgrid(coords - center[1], coords - center[0], indexing="ij")   # (H, W) each
    sdf = _signed_distance(attributes.shape, x, y, radius * scale)
    coverage = (0.5 - sdf).clamp(0, 1)                                    # 1 inside, 0 outside, ramp at the edge
    fg = torch.tensor(PALETTE[attributes.color], dtype=torch.float32).view(3, 1, 1) / 255
    bg = torch.tensor(PALETTE[attributes.background], dtype=torch.float32).view(3, 1, 1) / 255
    return bg + (fg - bg) * coverage                                      # (3, H, W)


def draw_with_jitter(attributes: Attributes, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Draw `attributes` as the dataset does: a random radius within the size's range, the centre jittered."""
    scale = image_size / REFERENCE_SIZE
    radius = rng.uniform(*(LARGE_RADIUS if attributes.size == "large" else SMALL_RADIUS))
    dx, dy = OFFSETS[attributes.position]
    cx = image_size / 2 + (dx * CORNER_OFFSET + rng.uniform(-JITTER, JITTER)) * scale
    cy = image_size / 2 + (dy * CORNER_OFFSET + rng.uniform(-JITTER, JITTER)) * scale
    return draw(attributes, image_size, radius, (cx, cy))


def _sample(rng: np.random.Generator, combos: list, image_size: int) -> tuple[torch.Tensor, str, Attributes, list[int]]:
    """One image, its caption, its attributes, and the caption's label row (NOT_SAID where a word is left out)."""
    shape, color, background = combos[rng.integers(len(combos))]
    size = SIZES[rng.integers(len(SIZES))]
    position = "center" if size == "large" else POSITIONS[rng.integers(len(POSITIONS))]
    attributes = Attributes(shape, color, background, size, position)
    image = draw_with_jitter(attributes, image_size, rng)
    said_size = size if rng.random() < P_SIZE_WORD else None
    said_position = position if size == "small" and rng.random() < P_POSITION_WORDS else None
    said = attributes.label()
    said[3] = said[3] if said_size else NOT_SAID
    said[4] = said[4] if said_position else NOT_SAID
    return image, caption_for(shape, color, background, said_size, said_position), attributes, said


SPLITS = ("train", "held_out", "all")


class ShapesDataset(Dataset):
    """`length` captioned shape images, drawn once at construction; item i is the same for the same seed.

    split: "train" never draws a HELD_OUT combination, "held_out" draws only those, "all" draws from all 90.
    Items are dicts: image (3, H, W) in [-1, 1] (SD's pixel range), caption, and the attribute indices
    shape, color, background, size, position (into SHAPES, COLORS, COLORS, SIZES, POSITIONS).
    `labels` (N, 5) holds those indices for every image, `said` (N, 5) the same where the caption says the
    attribute and NOT_SAID where it leaves it out (size and position words are sometimes dropped).
    """

    def __init__(self, length: int = 10_000, image_size: int = REFERENCE_SIZE, seed: int = 0, split: str = "train",
                 progress: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 16 or image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, at least 16 (e.g. 32 or 64), got {image_size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        combos = {"train": training_combinations(), "held_out": list(HELD_OUT), "all": all_combinations()}[split]
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        images, self.captions, self.attributes, said = [], [], [], []
        # about 700 images a second on one CPU core: the 20,000 of `python -m sd train` take half a minute
        for _ in tqdm(range(length), disable=not progress, desc=f"drawing {length:,} {split} images", unit="img"):
            image, caption, attributes, caption_label = _sample(rng, combos, image_size)
            images.append(image)
            self.captions.append(caption)
            self.attributes.append(attributes)
            said.append(caption_label)
        # stored as bytes: 10,000 images at 32 x 32 take 30 MB
        self.images = (torch.stack(images) * 255).round().to(torch.uint8)    # (N, 3, H, W)
        self.labels = torch.tensor([a.label() for a in self.attributes], dtype=torch.long)   # (N, 5)
        self.said = torch.tensor(said, dtype=torch.long)                                    # (N, 5)
        self.image_size, self.seed, self.split = image_size, seed, split

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: list[int]) -> "ShapesDataset":
        """A dataset of these items only, in this order (e.g. the large shapes), with everything they carry."""
        if not indices or not all(isinstance(i, int) and 0 <= i < len(self) for i in indices):
            raise ValueError(f"indices must be a non-empty list of item numbers in [0, {len(self)}), "
                             f"got {indices!r:.80}")
        part = object.__new__(ShapesDataset)
        part.captions = [self.captions[i] for i in indices]
        part.attributes = [self.attributes[i] for i in indices]
        rows = torch.tensor(indices)
        part.images, part.labels, part.said = self.images[rows], self.labels[rows], self.said[rows]
        part.image_size, part.seed, part.split = self.image_size, self.seed, self.split
        return part

    def pixels(self, index) -> torch.Tensor:
        """Images at `index` (an int, a slice or a tensor of indices) in SD's pixel range [-1, 1]."""
        return self.images[index].float() / 127.5 - 1

    def __getitem__(self, i: int) -> dict:
        return {"image": self.pixels(i), "caption": self.captions[i],
                **dict(zip(ATTRIBUTE_NAMES, self.labels[i].tolist()))}


def show_grid(images: torch.Tensor, captions: list[str] | None = None, ncols: int = 6, title: str | None = None):
    """A matplotlib figure of (B, 3, H, W) images in [-1, 1], each with its caption wrapped underneath."""
    import matplotlib.pyplot as plt       # optional: the course's extra, not the package's dependency
    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2 * ncols, 2.3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, range(nrows * ncols)):
        ax.axis("off")
        if k < n:
            ax.imshow(((images[k].detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy(),
                      interpolation="nearest")
            if captions is not None:
                ax.set_title("\n".join(textwrap.wrap(captions[k], 22)), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
