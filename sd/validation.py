"""Input validation shared by the models: one clear line about what was expected, before any matmul."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def nearest_multiples(n: int, m: int) -> str:
    """The multiples of m just below and above n, for error messages ("try 504 or 512")."""
    lo = max(m, (n // m) * m)
    hi = lo if lo >= n else lo + m
    return f"{lo}" if lo == hi or lo == n else f"{lo} or {hi}"


def require_number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (not a bool) in [low, high] -> float; else one line naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def require_int(value, name: str, low: int, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high]; else one line naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value}")
    return int(value)


def require_texts(value, name: str) -> list[str]:
    """A string or a non-empty list/tuple of strings -> a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__} {value!r}")


def require_finite_tensor(x, name: str) -> torch.Tensor:
    """A torch.Tensor without NaN or infinity."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return x


def require_image_like(x: torch.Tensor, name: str, channels: int, multiple: int, what: str) -> None:
    """Raise ValueError unless x is (B, channels, H, W) with H and W multiples of `multiple`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, {channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W) ({what}), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    for side, size in (("height", h), ("width", w)):
        if size % multiple != 0 or size == 0:
            raise ValueError(f"{name} {side} must be a multiple of {multiple} ({what}), got {size}; "
                             f"the nearest sizes that work are {nearest_multiples(size, multiple)}")

