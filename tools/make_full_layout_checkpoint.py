"""Write a scaled-down checkpoint in SD v1.5's own single-file (CompVis) key layout, with random weights.

It stands in for `v1-5-pruned-emaonly.safetensors` where the real file cannot be had (CI, no Hub): the same 1,131
keys under the same names (UNet, VAE, CLIP with the full 49,408-token vocabulary, so the real CLIP tokenizer
drives it), only with small widths. The notebooks' GPU branch (FULL_SIZE) runs on it on a CPU:

    python -m tools.make_full_layout_checkpoint /tmp/sd15_layout.safetensors
    SD_CHECKPOINT=/tmp/sd15_layout.safetensors SD_FULL_SIZE=1 ... pytest --nbval-lax solutions

The models are built by the reference libraries (diffusers, transformers) and written by tests/compvis_layout.py,
which is independent of `sd`'s loader, so loading the file is a real test of the loader.
Run from the repository root (it imports the tests' reference builders).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

import sd
from tests.compvis_layout import compvis_checkpoint
from tests.reference import diffusers_unet, diffusers_vae, randomize, transformers_clip

# SD v1.5's structure (4 levels, 2 blocks per level, attention in the first three, 8 heads, CLIP's full vocabulary
# and 64-wide heads) at widths that run in seconds on a CPU. GroupNorm's 32 groups need widths in multiples of 32.
UNET = sd.UNetConfig(block_channels=(32, 64, 128, 128), context_dim=64)   # SD: 320, 640, 1280, 1280
VAE = sd.VAEConfig(block_channels=(32, 64, 128, 128))                       # SD: 128, 256, 512, 512
CLIP = sd.CLIPConfig(width=64, layers=12, heads=1, mlp_width=256)        # SD: 768 wide, 12 heads, MLP 3072
SEED = 0


def full_layout_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random weights (seeded) in the CompVis layout of SD v1.5, at small widths."""
    ref = {"unet": randomize(diffusers_unet(UNET), seed), "vae": randomize(diffusers_vae(VAE), seed + 1),
           "clip": randomize(transformers_clip(CLIP), seed + 2)}
    return {k: v.contiguous() for k, v in compvis_checkpoint(ref).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = full_layout_state_dict()
    save_file(state, str(args.out))
    print(f"wrote {args.out}: {len(state)} tensors in SD v1.5's layout, "
          f"{sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
