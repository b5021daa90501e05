"""The loaded model: CLIP, VAE encoder and decoder, UNet, tokenizer and scheduler together."""
from __future__ import annotations

import torch
from torch import nn


class StableDiffusion:
    """What `sd.load_checkpoint` returns: the seed's four models plus the tokenizer and the noise scheduler."""

    def __init__(self, clip: nn.Module, encoder: nn.Module, decoder: nn.Module, unet: nn.Module,
                 tokenizer=None, scheduler=None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.clip, self.encoder, self.decoder, self.unet = clip, encoder, decoder, unet
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.device, self.dtype = torch.device(device), dtype

    def models(self) -> dict[str, nn.Module]:
        return {"clip": self.clip, "encoder": self.encoder, "decoder": self.decoder, "unet": self.unet}
