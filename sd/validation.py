"""Input validation shared by the models: one clear line about what was expected, before any matmul."""
from __future__ import annotations

import torch


def nearest_multiples(n: int, m: int) -> str:
    """The multiples of m just below and above n, for error messages ("try 504 or 512")."""
    lo = max(m, (n // m) * m)
    hi = lo if lo >= n else lo + m
    return f"{lo}" if lo == hi or lo == n else f"{lo} or {hi}"


def check_image_like(x: torch.Tensor, name: str, channels: int, multiple: int, what: str) -> None:
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

