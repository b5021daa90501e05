"""Input validation shared by the models and every API: one clear line about what was expected, before any work.

The conventions every sampling or editing API follows (generate, inpaint, invert, interpolate, generate_with_loss;
ControlNet and the LCM sampler), so that one mistake reads the same everywhere:
- step 0 of the function checks every argument with these functions, before any model runs or any state changes;
  an adapter checks its whole file too, then applies it (a refused call leaves the pipeline as it was);
- the message is one line, "<name> must <rule>, got <type> <value>" (a hint in parentheses where one helps);
  TypeError for a wrong type (a bool or a str is not a number), ValueError for a wrong value;
- seeds `require_seed`, step counts `require_steps`, strengths `require_strength`, scales (guidance, LoRA, loss)
  `require_scale`, options `require_choice`/`require_flag`, prompts `require_prompts`/`require_text`;
- every picture (init image, mask, control image) `require_picture(name, value, mask=...)`: see its rules below.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_BYTE = 255                # the largest 8-bit pixel value: PIL images and uint8 arrays hold 0..255


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
        bounds = f"lie in [{low}, {high}]" if low is not None and high is not None else \
            f"be >= {low}" if low is not None else f"be <= {high}"
        raise ValueError(f"{name} must {bounds}, got {value}")
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


def require_text(value, name: str) -> str:
    """One string (for the APIs that take one prompt)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def require_file(value, name: str, what: str) -> Path:
    """The path (str or os.PathLike) of an existing file, e.g. a LoRA or an embedding; else one line."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be the path of a {what} (a str or pathlib.Path), got {type(value).__name__} "
                        f"{value!r}")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}" + (" (a folder)" if path.is_dir() else ""))
    return path


def require_finite_tensor(x, name: str) -> torch.Tensor:
    """A torch.Tensor without NaN or infinity."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return x


def require_context(context, width: int, batch: int) -> torch.Tensor:
    """Text states for a denoiser: (B or 1, T, width), returned expanded to the batch; else one line saying why not."""
    if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[-1] != width:
        raise ValueError(f"context must be (B, T, {width}) text embeddings (CLIP's output), "
                         f"got {tuple(getattr(context, 'shape', ()))}")
    if context.shape[0] not in (1, batch):
        raise ValueError(f"context batch {context.shape[0]} does not match the latent batch {batch} (or 1)")
    return context.expand(batch, -1, -1)


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



# --- the arguments every sampling API takes (generate, inpaint, invert, interpolate, ControlNet) ------------------
MAX_SEED = 2 ** 64 - 1        # torch.Generator.manual_seed takes 64-bit seeds


def require_seed(value, name: str = "seed") -> int | None:
    """None (a random seed) or an integer in [0, 2**64 - 1], the seeds torch.Generator takes."""
    return None if value is None else require_int(value, name, 0, MAX_SEED)


def require_steps(value, maximum: int, name: str = "num_inference_steps") -> int:
    """A number of sampling steps: an integer from 1 to `maximum`, the schedule's training steps (1000 for SD)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not 1 <= value <= maximum:
        raise ValueError(f"{name} must be an integer from 1 to {maximum} (the training steps), got {value}")
    return int(value)


def require_strength(value, name: str = "strength") -> float:
    """How much of a picture is redrawn: a number in (0, 1] (1: from pure noise; 0 would run no step)."""
    value = require_number(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1] (1: start from pure noise), got {value}")
    return value


def require_scale(value, name: str = "scale", low: float | None = None, high: float | None = None) -> float:
    """A scale (guidance, LoRA strength, loss weight): a finite real number, bool and str refused."""
    return require_number(value, name, low, high)


def require_choice(value, name: str, choices: tuple[str, ...]) -> str:
    """One of a few named options."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def require_flag(value, name: str) -> bool:
    """A yes/no option: True or False only (a string such as "no" would count as yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def require_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """prompt and negative_prompt -> two lists of equal length (one negative string serves every prompt)."""
    prompts = require_texts(prompt, "prompt")
    negatives = require_texts(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one each, or one string")
    return prompts, negatives


# --- pictures given to the pipeline: init images, masks, control images -----------------------------------------
# One set of rules for every one of them (README, "Refused input"):
# - a PIL image (any mode: converted to RGB, or to greyscale "L" for a mask, as PIL and diffusers convert);
# - a numpy array (H, W) (grey) or (H, W, 3) (RGB); a mask may also be (H, W, 1), and its 3 channels must be equal;
# - uint8 in 0..255, or floats in [0, 1] (a mask may also be bool: True = white);
# anything else (channels first, [-1, 1], 0..255 held as floats, other integer types, NaN, torch tensors) is refused
# in one line saying which rule, because each would otherwise be misread silently (clipped, wrapped, or divided).
PIL_NUMBER_MODES = ("I", "F")   # PIL modes holding 32-bit ints or floats: read as arrays, under the array rules


def require_picture(name: str, value, *, mask: bool = False) -> Image.Image:
    """A picture (or, mask=True, a mask) following the rules above -> an 8-bit PIL image, "RGB" (mask: "L")."""
    mode = "L" if mask else "RGB"
    if isinstance(value, Image.Image):
        if value.mode not in PIL_NUMBER_MODES and not value.mode.startswith("I;"):
            return value.convert(mode)
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        shapes = "(H, W), (H, W, 1) or (H, W, 3)" if mask else "(H, W) or (H, W, 3)"
        hint = " (convert it: tensor.cpu().numpy(), channels last)" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a PIL image or a numpy array {shapes}, got {type(value).__name__}{hint}")
    pixels = _array_channels_last(name, value, mask)                       # (H, W) or (H, W, 3)
    return Image.fromarray(_array_to_bytes(name, pixels, mask)).convert(mode)


def _array_channels_last(name: str, arr: np.ndarray, mask: bool) -> np.ndarray:
    """The shape rules: (H, W) or (H, W, 3), and for a mask (H, W, 1) or three equal channels -> (H, W)."""
    channels = (1, 3) if mask else (3,)
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[-1] in channels):
        shapes = "(H, W), (H, W, 1) or (H, W, 3)" if mask else "(H, W) or (H, W, 3)"
        hint = (" (channels first? use array.transpose(1, 2, 0))" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4)
                else " (RGBA? drop the alpha: array[..., :3])" if arr.ndim == 3 and arr.shape[-1] == 4
                else " (a batch? give one picture)" if arr.ndim == 4 else "")
        raise ValueError(f"{name} array must be {shapes}, got shape {arr.shape}{hint}")
    if arr.size == 0:
        raise ValueError(f"{name} array is empty, got shape {arr.shape}")
    if mask and arr.ndim == 3:
        if arr.shape[-1] == 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                       and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ValueError(f"{name} array's 3 channels must be equal (a grey mask: white = repaint, black = keep), "
                             f"got channels that differ; pass one channel, e.g. array[..., 0]")
        arr = arr[..., 0]                                                  # (H, W, 1 or 3) -> (H, W)
    return arr


def _array_to_bytes(name: str, arr: np.ndarray, mask: bool) -> np.ndarray:
    """The value rules: uint8 as it is, floats in [0, 1] rounded to 8 bits, a mask's bool as 0 / 255."""
    if arr.dtype == np.uint8:
        return arr
    if mask and arr.dtype == np.bool_:
        return arr.astype(np.uint8) * MAX_BYTE
    kinds = "uint8 in 0..255, float in [0, 1] or bool" if mask else "uint8 in 0..255 or float in [0, 1]"
    if not np.issubdtype(arr.dtype, np.floating):
        hint = " (8-bit values in a wider type? use array.astype(np.uint8))" \
            if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= MAX_BYTE else ""
        raise ValueError(f"{name} array must be {kinds}, got dtype {arr.dtype}{hint}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} array has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        hint = " (in SD's [-1, 1]? pass (x + 1) / 2)" if lo >= -1 and hi <= 1 else \
            " (8-bit values? pass a uint8 array)" if lo >= 0 and hi <= MAX_BYTE else ""
        raise ValueError(f"{name} float array must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return (arr * MAX_BYTE).round().astype(np.uint8)
