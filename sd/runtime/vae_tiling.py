"""Decoding large latents in overlapping tiles, so the VAE's memory stays bounded at any image size.

Each tile is decoded on its own; where tiles overlap, a linear ramp blends them so no seam shows.
GroupNorm and the mid-block attention then see one tile at a time, so the result is close to, not equal to,
a whole decode (diffusers' tiling makes the same trade).
"""
from __future__ import annotations

import torch

TILE_LATENT = 64     # latent tile side: 64 latents = 512 pixels, the size SD's VAE was trained at
OVERLAP_LATENT = 8   # latents shared by neighbouring tiles, blended


def _ramp(n: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def decode_tiled(decoder, latents: torch.Tensor, tile: int = TILE_LATENT, overlap: int = OVERLAP_LATENT) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 3, f*h, f*w) image, decoded tile by tile."""
    b, _, h, w = latents.shape
    if h <= tile and w <= tile:
        return decoder(latents)
    f = decoder.config.downsample_factor
    stride = tile - overlap
    out = torch.zeros(b, 3, h * f, w * f, device=latents.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * f, w * f, device=latents.device, dtype=torch.float32)
    tops = sorted({min(y, max(h - tile, 0)) for y in range(0, h, stride)})
    lefts = sorted({min(x, max(w - tile, 0)) for x in range(0, w, stride)})
    for top in tops:
        for left in lefts:
            part = decoder(latents[:, :, top:top + tile, left:left + tile]).float()   # (B, 3, f*th, f*tw)
            th, tw = part.shape[-2:]
            # weights ramp up over the overlap on every side that has a neighbour, so tiles fade into each other
            wy = torch.ones(th, device=latents.device)
            wx = torch.ones(tw, device=latents.device)
            n = overlap * f
            if top > 0:
                wy[:n] = _ramp(n, latents.device)
            if top + tile < h:
                wy[-n:] = torch.minimum(wy[-n:], _ramp(n, latents.device).flip(0))
            if left > 0:
                wx[:n] = _ramp(n, latents.device)
            if left + tile < w:
                wx[-n:] = torch.minimum(wx[-n:], _ramp(n, latents.device).flip(0))
            mask = (wy[:, None] * wx[None, :])[None, None]                           # (1, 1, th, tw)
            ys, xs = slice(top * f, top * f + th), slice(left * f, left * f + tw)
            out[:, :, ys, xs] += part * mask
            weight[:, :, ys, xs] += mask
    return out / weight
