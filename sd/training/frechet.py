"""The Fréchet distance between two sets of pictures, measured on the attribute judge's features.

FID's formula (Heusel et al. 2017, eq. 6) on the features of `sd.training.evaluation`'s attribute classifier
instead of Inception's (no download; the judge knows the shapes pictures): fit a Gaussian to each set's features,

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

Lower is better; two independent sets of real pictures give the floor (a few hundred features of a few hundred
pictures are noisy: compare sets of the same size, and repeat with other seeds before calling a difference real).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .evaluation import AttributeClassifier, with_coordinates

# The judge reads 32 x 32 pictures; smaller ones are upsampled (nearest), real and drawn alike.
JUDGE_SIZE = 32
# A picture counts as read with confidence when the judge gives every attribute's top value at least this probability.
CONFIDENT = 0.9
# Fewer pictures than this give a covariance too rank-deficient to mean much.
MIN_PICTURES = 2


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


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix, by its eigendecomposition."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < MIN_PICTURES:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"frechet_distance: {name} must be a (N, D) feature tensor with N >= {MIN_PICTURES}, "
                             f"got {shape}")
        if not torch.isfinite(x).all():
            raise ValueError(f"frechet_distance: {name} has NaN or infinite features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: the feature sizes differ ({a.shape[1]} and {b.shape[1]})")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a^1/2 S_b S_a^1/2)^1/2) = tr((S_a S_b)^1/2), computed on a symmetric matrix
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * cross))
