"""Pictures in and out of the package: its pixel ranges, and conversions between tensors, arrays and PIL images.

One name per range:
- `SIGNED`, [-1, 1]: SD's pixel range, what the VAE encoder takes and the decoder returns
  (CompVis and diffusers both map 8-bit pixels with x / 127.5 - 1);
- `UNIT`, [0, 1]: what `generate(output_type="pt")` returns and what matplotlib's imshow shows;
- 8-bit, 0..255: PIL images and uint8 arrays, what files hold.

`init_image` conventions (image to image): a PIL image (any mode; converted to RGB), an (H, W, 3) uint8 array in
0..255, or an (H, W, 3) float array in [0, 1]. Anything else (channels first, [-1, 1], values over 255, NaN) is
refused with one line, because each would otherwise be silently misread (clipped to black or wrapped around).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIGNED = (-1.0, 1.0)
UNIT = (0.0, 1.0)
MAX_BYTE = 255


def signed_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: the decoder's output as a picture."""
    return (images / 2 + 0.5).clamp(0, 1)


def unit_to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: a picture as the encoder's input."""
    return images * 2 - 1


def to_pil(images: torch.Tensor, value_range: tuple[float, float] = UNIT) -> list[Image.Image]:
    """(B, 3, H, W) in `value_range` (UNIT or SIGNED) -> 8-bit RGB PIL images, rounded as diffusers does."""
    if value_range not in (UNIT, SIGNED):
        raise ValueError(f"value_range must be sd.images.UNIT {UNIT} or sd.images.SIGNED {SIGNED}, got {value_range!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {tuple(getattr(images, 'shape', ()))}")
    unit = signed_to_unit(images) if value_range == SIGNED else images.clamp(0, 1)
    arr = (unit.detach().float().permute(0, 2, 3, 1).cpu().numpy() * MAX_BYTE).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """An init_image array -> a PIL image, after checking it follows the conventions in the module docstring."""
    if arr.ndim != 3 or arr.shape[-1] != 3:
        hint = " (channels first? use array.transpose(1, 2, 0))" if arr.ndim == 3 and arr.shape[0] == 3 else ""
        raise ValueError(f"init_image array must be (H, W, 3), got shape {arr.shape}{hint}")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"init_image array must be uint8 in 0..255 or float in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("init_image array has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        hint = " (in SD's [-1, 1]? pass (x + 1) / 2)" if lo >= -1 and hi <= 1 else \
            " (8-bit values? pass a uint8 array)" if lo >= 0 and hi <= MAX_BYTE else ""
        raise ValueError(f"init_image float array must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return Image.fromarray((arr * MAX_BYTE).round().astype(np.uint8))


def as_rgb_image(image) -> Image.Image:
    """An init_image (PIL image or (H, W, 3) array, see the conventions above) -> an RGB PIL image."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"init_image must be a PIL image or an (H, W, 3) numpy array, got {type(image).__name__}")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) in SIGNED [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / MAX_BYTE                  # (H, W, 3) in [0, 1]
    return unit_to_signed(torch.from_numpy(arr).permute(2, 0, 1)[None])  # (1, 3, H, W) in [-1, 1]
