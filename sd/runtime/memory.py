"""How much memory a `generate` call needs, estimated before anything is allocated, and how much the device has.

The weights are already in memory; what a call adds is activations. The UNet (at the guided batch) and the VAE
decoder (at full resolution) run one after the other, so the peak is the larger of the two. Both are counted in
feature maps of their widest-resolution level, with the number of such maps alive at the peak calibrated by
`python -m benchmarks.memory` on SD v1.5 at 512x512 (benchmarks/results/memory_estimate_fp16.txt: UNet 0.12 GB
at a guided batch of 2 in float16, decode 0.81 GB per image in float32). The memory-efficient attention kernels
(SDPA) keep attention linear in the number of pixels, so it adds no term of its own.
"""
from __future__ import annotations

from pathlib import Path

import torch

UNET_LIVE_MAPS = 23        # 0.12e9 B / (2 x 64 x 64 latent pixels x 320 channels x 2 B)
DECODER_LIVE_MAPS = 6      # 0.81e9 B / (512 x 512 pixels x 128 channels x 4 B)
# A transformer block's live token-sized maps: q, k, v, the attention output, the MLP's 4 hidden widths and the
# residual stream, 9 (counted from sd/mmdit_blocks.py, not calibrated on a GPU); the text tokens come along.
TRANSFORMER_LIVE_MAPS = 9
MEMINFO = Path("/proc/meminfo")
GB = 1e9


def estimate_generate_bytes(pipe, batch: int, height: int, width: int) -> dict[str, float]:
    """Bytes of activations for `batch` images of height x width: {"unet", "decode", "peak"}."""
    f = pipe.vae_factor
    latent_pixels = (height // f) * (width // f)
    guided_batch = 2 * batch                                   # conditional and unconditional rows
    cfg = pipe.unet.config
    if hasattr(cfg, "patch_size"):                            # a transformer (sd/mmdit.py): tokens x width
        tokens = latent_pixels // cfg.patch_size ** 2 + pipe.clip.config.max_tokens
        unet = guided_batch * tokens * cfg.width * TRANSFORMER_LIVE_MAPS * pipe.dtype.itemsize
    else:
        unet = guided_batch * latent_pixels * cfg.block_channels[0] * UNET_LIVE_MAPS * pipe.dtype.itemsize
    decoded_at_once = 1 if pipe.vae_slicing else batch
    if pipe.vae_tiling:                                       # tiles of 512 pixels at most
        height, width = min(height, 512), min(width, 512)
    decoder_width = pipe.decoder.config.block_channels[0]
    decode = decoded_at_once * height * width * decoder_width * DECODER_LIVE_MAPS * torch.float32.itemsize
    return {"unet": unet, "decode": decode, "peak": max(unet, decode)}


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device: the GPU's free memory, or the machine's available RAM; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        # what Metal lets this process use (about 2/3 to 3/4 of a Mac's memory), less what it holds already
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    if device.type == "cpu" and MEMINFO.exists():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024       # the file counts kB
    return None


def require_memory_for(pipe, batch: int, height: int, width: int) -> None:
    """Refuse, in one line with the estimate and the device's memory, a request that cannot fit."""
    need = estimate_generate_bytes(pipe, batch, height, width)
    free = available_bytes(pipe.device)
    if free is not None and need["peak"] > free:
        raise ValueError(
            f"{batch} image(s) of {width}x{height} need about {need['peak'] / GB:.1f} GB of activations "
            f"(UNet {need['unet'] / GB:.1f} GB, VAE decode {need['decode'] / GB:.1f} GB) but {pipe.device} has "
            f"{free / GB:.1f} GB free: ask for fewer or smaller images, or call enable_vae_slicing()/enable_vae_tiling()")
