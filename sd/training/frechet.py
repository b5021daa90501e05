"""The Fréchet distance between two sets of features: FID's formula, here on the attribute judge's features.

FID (Heusel et al. 2017, eq. 6) compares Inception-v3 features of real and generated photographs. The shapes course
uses the features of its own attribute judge instead (`sd.training.evaluation.judge_features`): no download, and a
network that knows 16- and 32-pixel shapes, which Inception, trained on ImageNet photographs, does not. Fit a
Gaussian to each set's features,

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

Lower is better; two independent sets of real pictures give the floor (a few hundred features of a few hundred
pictures are noisy: compare sets of the same size, and repeat with other seeds before calling a difference real).
"""
from __future__ import annotations

import torch

# Fewer pictures than this give a covariance too rank-deficient to mean much.
MIN_PICTURES = 2


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
