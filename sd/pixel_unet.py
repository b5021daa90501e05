"""The tiny pixel-space denoiser of notebook 04, as a package module, for notebooks and benchmarks that reuse it.

# Copied from solutions/04_pixel_diffusion.ipynb (ResBlock, TinyUNet), where the learner meets it; kept identical so
# that weights trained there or here load into either.

A network f(x_t, t) for 16 x 16 RGB pictures: two resolution levels with skips, GroupNorm-SiLU-conv residual blocks
with the time added after the first convolution (as SD's UNet residual block), no attention. Trained on the ε target
it predicts the noise (notebook 04); trained on the flow-matching target it predicts the velocity (notebook 13), with
the time t in [0, 1] fed as 1000 t so that the same sinusoidal features cover the same range.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .timestep_embedding import timestep_embedding

IMAGE_SIZE = 16   # notebook 04's pictures: 16 x 16, the shapes dataset's large shapes
# Notebook 04's schedule: Nichol & Dhariwal 2021's cosine alpha_bar (eq. 17) with its offset s and beta clipping.
T = 1000
COSINE_S = 0.008
MAX_BETA = 0.999
CHANNELS = 16     # 16 x 16: 16 channels, 8 x 8: 32, 4 x 4: 64
GROUPS = 8        # GroupNorm groups


def cosine_alpha_bar(num_steps: int = T) -> torch.Tensor:
    """(num_steps,) alpha_bar_t of the cosine schedule, f(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped."""
    f = torch.cos((torch.arange(num_steps + 1) / num_steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)          # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    return torch.cumprod(1 - betas, dim=0)


@torch.no_grad()
def sample_eps_clipped(model, noise: torch.Tensor, steps: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) with the predicted x0 clipped to [-1, 1] and the noise
    recomputed from it (diffusers' DDIMScheduler, clip_sample), from t = 999 in `steps` evenly spaced steps to a clean
    picture; the pixel model's sampler for few steps (notebook 04 clips the same way in its DDPM loop)."""
    timesteps = torch.linspace(len(alpha_bar) - 1, 0, steps + 1)[:-1].round().long()   # 999, 500 for 2 steps
    x = noise
    for i, t in enumerate(timesteps):
        a_t = alpha_bar[t]
        a_prev = alpha_bar[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        eps = model(x, t.expand(x.shape[0]))
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)   # the clean picture it implies, clipped
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()                   # the noise consistent with the clipped x0
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps              # eq. 12 with sigma_t = 0
    return x.clamp(-1, 1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the timestep; GroupNorm, SiLU, conv; plus the skip (as SD's UNet residual block)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(time)[:, :, None, None]   # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """f(x_t, t): (B, 3, 16, 16) and (B,) timesteps in [0, 1000) -> (B, 3, 16, 16) (noise, or velocity)."""

    def __init__(self, c: int = CHANNELS):
        super().__init__()
        self.c, time_dim = c, 4 * c
        self.time_mlp = nn.Sequential(nn.Linear(c, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c, c, time_dim), nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2, self.pool2 = ResBlock(c, 2 * c, time_dim), nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 4 * c, time_dim)
        self.up2 = ResBlock(4 * c + 2 * c, 2 * c, time_dim)
        self.up1 = ResBlock(2 * c + c, c, time_dim)
        self.conv_out = nn.Sequential(nn.GroupNorm(GROUPS, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(timestep_embedding(t, self.c))             # (B,) -> (B, c) -> (B, 4c)
        h1 = self.down1(self.conv_in(x), time)                          # (B, c, 16, 16)
        h2 = self.down2(self.pool1(h1), time)                           # (B, 2c, 8, 8)
        h = self.mid(self.pool2(h2), time)                              # (B, 4c, 4, 4)
        h = F.interpolate(h, scale_factor=2, mode="nearest")           # (B, 4c, 8, 8)
        h = self.up2(torch.cat([h, h2], dim=1), time)                   # (B, 6c, 8, 8) -> (B, 2c, 8, 8)
        h = F.interpolate(h, scale_factor=2, mode="nearest")           # (B, 2c, 16, 16)
        h = self.up1(torch.cat([h, h1], dim=1), time)                   # (B, 3c, 16, 16) -> (B, c, 16, 16)
        return self.conv_out(h)                                         # (B, 3, 16, 16)


# The two reference runs shipped with the package (python -m benchmarks.pixel_flow_matching --seeds 0 --save):
# the same initial weights, pictures and 1,250 steps, one on the ε target and one on the flow-matching target.
ASSETS = Path(__file__).resolve().parent / "assets"
PRETRAINED = {"eps": ASSETS / "pixel_eps_unet.safetensors", "flow": ASSETS / "pixel_flow_unet.safetensors"}


def load_pixel_unet(objective: str) -> TinyUNet:
    """The shipped TinyUNet trained on `objective` ("eps" or "flow"), in float32 and eval mode."""
    if objective not in PRETRAINED:
        raise ValueError(f"objective must be one of {', '.join(PRETRAINED)}, got {objective!r}")
    model = TinyUNet()
    state = {k: v.float() for k, v in load_file(PRETRAINED[objective]).items()}
    model.load_state_dict(state)
    return model.eval()
