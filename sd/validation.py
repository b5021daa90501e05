"""Input validation shared by the models: one clear line about what was expected, before any matmul."""
from __future__ import annotations

import torch


def nearest_multiples(n: int, m: int) -> str:
    """The multiples of m just below and above n, for error messages ("try 504 or 512")."""
    lo = max(m, (n // m) * m)
    hi = lo if lo >= n else lo + m
    return f"{lo}" if lo == hi or lo == n else f"{lo} or {hi}"


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device -> a device this
    machine has; else one line saying what is available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (no GPU, or a CPU-only "
                             f"torch {torch.__version__}); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's MPS is not available on this machine; use cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return resolved
