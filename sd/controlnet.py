"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder steers the frozen UNet with a picture.

A control image (edges, a pose, a depth map), 8x the latent's side, goes through a small conv net down to the
latent's size and is added after the copy's input convolution. The copy (input conv, down path, middle block, built
from the UNet's own blocks) then runs like the UNet's encoder, and every one of its 12 skips and its middle output
passes a 1x1 convolution initialised to zero (a "zero convolution", section 3.1, eq. 1-2). Those 13 residuals,
times `conditioning_scale`, are added to the UNet's skips and middle output (`DiffusionUNET.forward`'s
`down_residuals` and `mid_residual`). At initialisation they are all zero, so training starts from the UNet as it
was, and no harmful noise reaches it (section 3.1).

Where the numbers come from: [CLDM] lllyasviel's reference code,
https://github.com/lllyasviel/ControlNet/blob/1e5c75a5cfb45c3fc727a152238045fb51f5660a/cldm/cldm.py
(`ControlNet.__init__`: `input_hint_block`, `make_zero_conv`, `middle_block_out`; `ControlNet.forward`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import UNetConfig
from .timestep_embedding import TimeEmbedding, timestep_embedding
from .unet import DiffusionUNET, MidBlock, UNetDownLevel
from .validation import MAX_BYTE, require_context, require_image_like, require_number, require_picture, require_scale

# The conditioning embedding's widths: convs 3->16, 16->16, 16->32 (stride 2), 32->32, 32->96 (s2), 96->96,
# 96->256 (s2), then a zero conv 256 -> the UNet's first width; SiLU between ([CLDM] `input_hint_block`; the paper's
# section 3.2 describes an earlier 4-layer variant, the released models use these 8 convolutions).
EMBEDDING_CHANNELS = (16, 32, 96, 256)
CONDITIONING_CHANNELS = 3        # an RGB control image in [0, 1] ([CLDM] `hint_channels: 3` in models/cldm_v15.yaml)


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """The UNet's config (the copy has its encoder's shape) plus the conditioning embedding's."""
    conditioning_channels: int = CONDITIONING_CHANNELS
    embedding_channels: tuple = EMBEDDING_CHANNELS

    @classmethod
    def from_unet_config(cls, unet: UNetConfig, **changes) -> "ControlNetConfig":
        return cls(**{**unet.to_dict(), **changes})

    @property
    def hint_factor(self) -> int:
        """Control-image pixels per latent pixel, per side: the embedding halves it 3 times (8 for SD)."""
        return 2 ** (len(self.embedding_channels) - 1)


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias zero: its output is 0 until training moves it (section 3.1)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEmbedding(nn.Module):
    """Control image (B, 3, 8h, 8w) -> (B, C0, h, w): the first level's size and width (the paper's E, section 3.2)."""

    def __init__(self, out_channels: int, in_channels: int = CONDITIONING_CHANNELS,
                 widths: tuple = EMBEDDING_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))   # halves the side
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)   # zero at the start, like the zero convolutions ([CLDM] `zero_module`)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(hint))               # (B, 3, 8h, 8w) -> (B, 16, 8h, 8w)
        for conv in self.blocks:
            x = F.silu(conv(x))                      # ... -> (B, 256, h, w) after three stride-2 convs
        return self.conv_out(x)                      # (B, 256, h, w) -> (B, C0, h, w)


class ControlNet(nn.Module):
    """(noisy latent, text, timestep, control image) -> 12 skip residuals and 1 middle residual for the UNet."""

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or ControlNetConfig()
        ch, n = cfg.block_channels, cfg.layers_per_block
        last = len(ch) - 1
        # the copy of the UNet's encoder: the same modules under the same names, so the UNet's weights load into it
        self.time_embedding = TimeEmbedding(ch[0], cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.cond_embedding = ConditioningEmbedding(ch[0], cfg.conditioning_channels, cfg.embedding_channels)
        skip_channels = [ch[0]]
        self.down = nn.ModuleList()
        for i, out_ch in enumerate(ch):
            in_chs = [ch[max(i - 1, 0)]] + [out_ch] * (n - 1)
            self.down.append(UNetDownLevel(in_chs, out_ch, cfg, cfg.attention_levels[i], downsample=i < last))
            skip_channels += [out_ch] * (n + (i < last))
        self.mid = MidBlock(ch[-1], cfg)
        # one zero convolution per skip (12 in SD) and one on the middle output ([CLDM] `zero_convs`, `middle_block_out`)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in skip_channels)
        self.mid_zero_conv = zero_conv(ch[-1])

    @classmethod
    def from_unet(cls, unet: DiffusionUNET, **config_changes) -> "ControlNet":
        """A ControlNet whose encoder copy starts as the UNet's own (section 3.2: "a trainable copy")."""
        net = cls(ControlNetConfig.from_unet_config(unet.config, **config_changes))
        copied = {k: v for k, v in unet.state_dict().items() if k.startswith(("time_embedding.", "conv_in.", "down.",
                                                                               "mid."))}
        unexpected = net.load_state_dict(copied, strict=False).unexpected_keys   # the zero convs and embedding stay
        assert not unexpected, f"the ControlNet lacks the UNet's {unexpected[:3]}"
        weight = next(unet.parameters())
        return net.to(weight.device, weight.dtype)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, timestep, control_image: torch.Tensor,
                conditioning_scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """control_image: (B or 1, 3, 8h, 8w) in [0, 1]. Returns (12 skip residuals, middle residual), scaled."""
        cfg = self.config
        require_image_like(latent, "latent", cfg.in_channels, cfg.downsample_factor,
                           "the UNet halves the latent 3 times, i.e. images in multiples of 64 pixels")
        scale = require_scale(conditioning_scale, "conditioning_scale")
        b, _, h, w = latent.shape
        hint = self._check_hint(control_image, b, h, w)
        context = require_context(context, cfg.context_dim, b)       # the UNet's own checks
        t = DiffusionUNET._timesteps(timestep, b, latent.device)

        # (B,) -> (B, 320) sinusoids -> (B, 1280), as in the UNet
        emb = self.time_embedding(timestep_embedding(t, cfg.block_channels[0]).to(latent.dtype))

        # the control enters once, after the input conv ([CLDM] `h += guided_hint`)
        x = self.conv_in(latent) + self.cond_embedding(hint.to(latent.dtype))   # (B, 4, h, w) -> (B, 320, h, w)
        skips = [x]
        for level in self.down:
            x = level(x, emb, context, skips)        # pushes its skips, as in the UNet
        x = self.mid(x, emb, context)

        down = [zc(s) * scale for zc, s in zip(self.zero_convs, skips)]   # 12 x (B, C_i, h_i, w_i)
        return down, self.mid_zero_conv(x) * scale                          # (B, 1280, h/8, w/8)

    def _check_hint(self, hint, b: int, h: int, w: int) -> torch.Tensor:
        cfg, f = self.config, self.config.hint_factor
        expected = (cfg.conditioning_channels, h * f, w * f)
        if not isinstance(hint, torch.Tensor) or hint.dim() != 4 or tuple(hint.shape[1:]) != expected:
            got = tuple(hint.shape) if isinstance(hint, torch.Tensor) else type(hint).__name__
            raise ValueError(f"control_image must be a (B, {expected[0]}, {expected[1]}, {expected[2]}) tensor "
                             f"({f}x the latent's {h}x{w}), got {got}")
        if hint.shape[0] not in (1, b):
            raise ValueError(f"control_image batch {hint.shape[0]} does not match the latent batch {b} (or 1)")
        return hint.expand(b, -1, -1, -1)


def controlnet_fits(net: ControlNet, unet: DiffusionUNET) -> str | None:
    """Why the ControlNet's residuals would not fit the UNet's skips (None if they do)."""
    a, u = net.config, unet.config
    for field in ("in_channels", "block_channels", "layers_per_block", "context_dim"):
        if getattr(a, field) != getattr(u, field):
            return f"its {field} is {getattr(a, field)}, the UNet's is {getattr(u, field)}"
    return None


# --- steering a sampling run: what generate(control_image=...) uses ---------------------------------------------------

@dataclass(frozen=True)
class ControlInputs:
    """The checked control arguments of one generate call, one entry per loaded ControlNet."""
    pictures: list[Image.Image]     # RGB, as given (resized to the output size by `control_tensor`)
    scales: list[float]             # controlnet_conditioning_scale
    starts: list[float]             # control_guidance_start: the fraction of the steps before it acts
    ends: list[float]               # control_guidance_end: the fraction of the steps after which it stops


def _per_net(value, name: str, n: int) -> list:
    """One value for every ControlNet, or a list/tuple of one each."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must hold one entry per loaded ControlNet ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def require_control(control_image, scale, start, end, n_nets: int) -> ControlInputs:
    """Check generate's control arguments against the number of loaded ControlNets; one line per mistake."""
    if n_nets == 0:
        raise ValueError("control_image needs a ControlNet: load one first with pipe.load_controlnet(path)")
    images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != n_nets:
        raise ValueError(f"control_image: {len(images)} pictures for {n_nets} loaded ControlNets; give one each")
    pictures = [require_picture("control_image" if n_nets == 1 else f"control_image[{i}]", p)
                for i, p in enumerate(images)]
    scales = [require_scale(v, "controlnet_conditioning_scale")
              for v in _per_net(scale, "controlnet_conditioning_scale", n_nets)]
    starts = [require_number(v, "control_guidance_start", 0.0, 1.0)
              for v in _per_net(start, "control_guidance_start", n_nets)]
    ends = [require_number(v, "control_guidance_end", 0.0, 1.0) for v in _per_net(end, "control_guidance_end", n_nets)]
    for s, e in zip(starts, ends):
        if s >= e:   # diffusers refuses the same (StableDiffusionControlNetPipeline.check_inputs)
            raise ValueError(f"control_guidance_start must be below control_guidance_end, got {s:g} and {e:g}")
    return ControlInputs(pictures, scales, starts, ends)


def control_tensor(picture: Image.Image, height: int, width: int) -> torch.Tensor:
    """An RGB picture -> (1, 3, height, width) in [0, 1] (not SD's [-1, 1]: ControlNets take the image as it is,
    as diffusers' control image processor gives it), resized with Lanczos where the size differs."""
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / MAX_BYTE)   # (H, W, 3) in [0, 1]
    return pixels.permute(2, 0, 1)[None]                                            # (1, 3, H, W)


class ControlledUNet:
    """The UNet as the sampler calls it, unet(x, context, t), with the ControlNets' residuals added.

    Each ControlNet acts on the steps whose share of the run lies in [start, end] (diffusers' `controlnet_keep`);
    the residuals of several ControlNets are summed. With classifier-free guidance the sampler passes both halves
    (unconditional first) as one batch, and the ControlNets see both with the same control image, as diffusers does
    without `guess_mode`.
    """

    def __init__(self, unet: nn.Module, nets: list[ControlNet], images: list[torch.Tensor], inputs: ControlInputs,
                 timesteps: torch.Tensor):
        self.unet, self.nets, self.images, self.inputs = unet, nets, images, inputs
        self.timesteps = timesteps.float().cpu()                  # (n,) the run's timesteps, to find the step

    def __call__(self, x: torch.Tensor, context: torch.Tensor, t) -> torch.Tensor:
        n = len(self.timesteps)
        i = int((self.timesteps - torch.as_tensor(t).float().cpu()).abs().argmin())   # this step's index
        down, mid = None, None
        for net, image, scale, start, end in zip(self.nets, self.images, self.inputs.scales, self.inputs.starts,
                                                 self.inputs.ends):
            if i / n < start or (i + 1) / n > end or scale == 0:
                continue                              # diffusers runs it with scale 0: the same zero residuals
            if image.shape[0] != x.shape[0]:          # guidance: (B, 3, H, W) -> (2B, 3, H, W), both halves
                image = torch.cat([image] * (x.shape[0] // image.shape[0]))
            d, m = net(x, context, t, image, scale)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(x, context, t, down_residuals=down, mid_residual=mid)


# --- making control images ------------------------------------------------------------------------------------------
# Canny's hysteresis thresholds on 0..255 grey levels: lllyasviel's canny demo's defaults (low 100, high 200),
# https://github.com/lllyasviel/ControlNet/blob/1e5c75a5cfb45c3fc727a152238045fb51f5660a/gradio_canny2image.py
CANNY_LOW, CANNY_HIGH = 100, 200
CANNY_SIGMA = 1.0                # the Gaussian smoothing before the gradient: scikit-image's default


def canny_control_image(picture, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """A picture -> its Canny edges as an RGB image (white edges on black), the input of a canny ControlNet.

    low, high: the hysteresis thresholds on the gradient magnitude of the 0..255 grey levels (lower: more edges).
    Uses scikit-image's `feature.canny` (an optional dependency, in the course extra: pip install -e .[course]);
    the ControlNet authors used OpenCV's Canny, whose gradients are scaled differently, so thresholds differ a bit.
    """
    rgb = require_picture("picture", picture)
    low = require_number(low, "low", low=0.0)
    high = require_number(high, "high", low=0.0)
    if low > high:
        raise ValueError(f"low must be <= high (the hysteresis thresholds), got low={low:g}, high={high:g}")
    try:
        from skimage import feature          # optional dependency: imported only when edges are asked for
    except ImportError:
        raise ImportError("canny_control_image needs scikit-image: pip install scikit-image "
                          "(or the course extra, pip install -e .[course])") from None
    grey = np.asarray(rgb.convert("L"), dtype=np.float64)                  # (H, W) in 0..255
    edges = feature.canny(grey, sigma=CANNY_SIGMA, low_threshold=low, high_threshold=high)   # (H, W) bool
    return Image.fromarray(edges.astype(np.uint8) * MAX_BYTE).convert("RGB")
