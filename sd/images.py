"""Pictures in and out of the package: its pixel ranges, and conversions between tensors, arrays and PIL images.

One name per range:
- `SIGNED`, [-1, 1]: SD's pixel range, what the VAE encoder takes and the decoder returns
  (CompVis and diffusers both map 8-bit pixels with x / 127.5 - 1);
- `UNIT`, [0, 1]: what `generate(output_type="pt")` returns and what matplotlib's imshow shows;
- 8-bit, 0..255: PIL images and uint8 arrays, what files hold.

Pictures given to the pipeline (`init_image`, `mask_image`, `control_image`) follow one set of
conventions, checked by `sd.validation.require_picture`: a PIL image (any mode; converted to RGB, a mask to
greyscale); or a numpy array (H, W) or (H, W, 3), uint8 in 0..255 or float in [0, 1]. A mask may also be (H, W, 1),
or bool (True = white = repaint); its three channels, if it has three, must be equal. Anything else (channels
first, [-1, 1], 0..255 held as floats, other integer types, NaN, a torch tensor) is refused with one line saying
which rule, because each would otherwise be silently misread (clipped to black, wrapped around, or divided by 255).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .validation import MAX_BYTE, require_picture

SIGNED = (-1.0, 1.0)
UNIT = (0.0, 1.0)


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


def as_rgb_image(image, name: str = "init_image") -> Image.Image:
    """A picture (PIL image or (H, W) / (H, W, 3) array, see the conventions above) -> an RGB PIL image."""
    return require_picture(name, image)


def as_mask_image(mask, name: str = "mask_image") -> Image.Image:
    """A mask (PIL image, or an (H, W), (H, W, 1) or equal-channel (H, W, 3) array) -> a greyscale ("L") PIL image."""
    return require_picture(name, mask, mask=True)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) in SIGNED [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / MAX_BYTE                  # (H, W, 3) in [0, 1]
    return unit_to_signed(torch.from_numpy(arr).permute(2, 0, 1)[None])  # (1, 3, H, W) in [-1, 1]
