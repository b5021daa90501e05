"""Which model family a checkpoint belongs to: SD v1.x loads, SD 2.x and SDXL are refused by name."""
from __future__ import annotations

import torch

from ..config import UNetConfig

# SD v1's cross-attention reads CLIP ViT-L/14's 768-wide text embeddings; SD 2.x's OpenCLIP ViT-H/14 gives 1024.
SD2_CONTEXT_DIM = 1024


def require_sd_v1(raw: dict[str, torch.Tensor]) -> None:
    """Raise a clear error for checkpoints of other model families (SD 2.x, SDXL, ...); any key layout."""
    names = list(raw)
    if any(k.startswith("conditioner.embedders.") for k in names) or any(".label_emb." in k for k in names):
        raise ValueError("this looks like an SDXL checkpoint (`conditioner.embedders.*`, `label_emb`): "
                         "only SD v1.x is supported")
    if any(k.startswith("cond_stage_model.model.") for k in names):
        raise ValueError("this looks like an SD 2.x checkpoint (OpenCLIP text encoder `cond_stage_model.model.*`): "
                         "only SD v1.x is supported")
    for k, v in raw.items():
        if k.endswith("attn2.to_k.weight") and v.shape[1] == SD2_CONTEXT_DIM:
            raise ValueError(f"this looks like an SD 2.x checkpoint (`{k}` takes {SD2_CONTEXT_DIM}-wide text "
                             "embeddings; SD v1 uses {UNetConfig().context_dim}): only SD v1.x is supported")
        if k.endswith(".proj_in.weight") and v.dim() == 2:
            raise ValueError(f"this looks like an SD 2.x checkpoint (`{k}` is a Linear layer; SD v1 uses 1x1 "
                             "convolutions): only SD v1.x is supported")


def require_text_to_image(in_channels: int, out_channels: int) -> None:
    """Inpainting (9 input channels) and depth (5) UNets take more than the noisy latent."""
    if in_channels != out_channels:
        raise ValueError(f"the UNet takes {in_channels} input channels (an inpainting or depth model?): "
                         "only SD v1.x text-to-image checkpoints are supported")
