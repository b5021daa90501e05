"""What a checkpoint reader hands on: state dicts in our names, and how errors should name what came from the file.

A message about a missing or unexpected weight names the file and the key as that file spells it
(`model.diffusion_model.output_blocks.5.2.conv.weight`), not our internal name (`up.1.upsample.conv.weight`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

PARTS = ("unet", "vae", "clip")
# This package's own files may hold a transformer (sd/mmdit.py) where an SD v1 file has its UNet.
TRANSFORMER = "transformer"
OWN_PARTS = (*PARTS, TRANSFORMER)
IN_MEMORY = "the state dict"


@dataclass(frozen=True)
class KeyNaming:
    """For each part ('unet', 'vae', 'clip'): the file it came from, and our keys as that file spells them."""
    files: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PARTS, IN_MEMORY))
    original: dict[str, dict[str, str]] = field(default_factory=dict)   # our key -> file key, for keys it has
    back: dict[str, Callable[[str], str]] = field(default_factory=dict)  # our key -> file key, for keys it lacks

    def file(self, part: str) -> str:
        return self.files.get(part, IN_MEMORY)

    def file_key(self, part: str, key: str) -> str:
        if key in self.original.get(part, {}):
            return self.original[part][key]
        return self.back[part](key) if part in self.back else f"{part}.{key}"


@dataclass
class Weights:
    """A checkpoint read into this package's names, ready for `build_models`."""
    parts: dict[str, dict[str, torch.Tensor]]        # 'unet' / 'vae' / 'clip' -> state dict in our names
    naming: KeyNaming = field(default_factory=KeyNaming)
    configs: dict = field(default_factory=dict)       # what shapes cannot tell (heads, latent scale), per part
    tokenizer_dir: Path | None = None                 # the model's own tokenizer folder, if it has one


def renamed(state: dict[str, torch.Tensor], to_ours: Callable[[str], str]) -> tuple[dict, dict[str, str]]:
    """A state dict in our names, and the mapping back to the file's keys (our key -> file key)."""
    ours, original = {}, {}
    for k, v in state.items():
        name = to_ours(k)
        if name in ours:
            raise ValueError(f"`{original[name]}` and `{k}` are the same weight under two names")
        ours[name], original[name] = v, k
    return ours, original


@contextmanager
def naming_the_file(where: str | Path):
    """Every ValueError raised inside starts with the file it is about."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def key_list(keys: list[str], shown: int = 5) -> str:
    """`a`, `b`, `c` and 3 more: a list of keys that fits on one line."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(f"`{k}`" for k in keys[:shown]) + more
