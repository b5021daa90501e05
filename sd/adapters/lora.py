"""LoRA (Hu et al. 2021): a frozen layer W plus a small trainable update, W x + scale * (alpha / r) * B A x.

A (r x in) squeezes the input to r numbers, B (out x r) spreads them back; r is a few, the layer thousands wide,
so the update has few parameters. B starts at zero: a freshly added LoRA changes nothing until it is trained.
The update is multiplied by alpha / r (the `--network_alpha` of kohya's trainer, PEFT's `lora_alpha`), which Hu et al.
(2021, sec. 4.1) use so that the learning rate need not be retuned much when r changes (rsLoRA's alpha / sqrt(r) is
what keeps the update's size steady across ranks); `scale` is the user's dial on top (0: off, 1: as trained).

A `LoRALayer` wraps the layer it adapts (a Linear, or a Conv2d, whose A is a convolution of the same kernel and
B a 1x1 one, as PEFT and kohya do). Injecting replaces the module by its wrapper; a second LoRA wraps the first
wrapper, so LoRAs stack. `fuse_lora` folds the update into W; `unload_lora` puts the original layers back.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import require_int, require_number, require_scale

# The UNet's attention projections (q, k, v and the output of attn1/attn2 in every transformer block, named as in
# sd/attention.py and sd/cross_attention.py): diffusers' train_text_to_image_lora.py adapts exactly these.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out")
# The text encoder's attention projections (sd/clip.py; transformers' q_proj, k_proj, v_proj, out_proj).
TEXT_ENCODER_TARGETS = ("to_q", "to_k", "to_v", "to_out")
# PEFT's initialisation of A (the default of nn.Linear): kaiming-uniform with a = sqrt(5).
LORA_A_INIT_GAIN = math.sqrt(5)


class LoRALayer(nn.Module):
    """base(x) + scale * (alpha / rank) * B(A(x)), for a Linear or Conv2d `base`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        rank = require_int(rank, "LoRA rank", 1)
        inner = innermost(base)
        weight = inner.weight
        if isinstance(inner, nn.Linear):
            # (.., in) -> (.., r) -> (.., out)
            self.lora_A = nn.Linear(inner.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, inner.out_features, bias=False)
        elif isinstance(inner, nn.Conv2d) and inner.groups == 1:
            # (B, in, H, W) -> (B, r, H', W') with the layer's own kernel, stride and padding -> (B, out, H', W')
            self.lora_A = nn.Conv2d(inner.in_channels, rank, inner.kernel_size, inner.stride, inner.padding,
                                    inner.dilation, bias=False)
            self.lora_B = nn.Conv2d(rank, inner.out_channels, 1, bias=False)
        else:
            raise ValueError(f"LoRA adapts nn.Linear and (ungrouped) nn.Conv2d layers, got {inner}")
        self.lora_A.to(device=weight.device, dtype=weight.dtype)
        self.lora_B.to(device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=LORA_A_INIT_GAIN)
        nn.init.zeros_(self.lora_B.weight)       # B = 0: the adapted layer starts as the original one
        self.base = base
        self.rank = rank
        self.alpha = float(rank) if alpha is None else require_number(alpha, "LoRA alpha")
        self.scale = require_scale(scale, "scale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.scale * self.alpha / self.rank) * self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight of the base's shape: scale * (alpha / r) * B A."""
        a, b = self.lora_A.weight, self.lora_B.weight
        # B (out, r[, 1, 1]) @ A (r, in[, kh, kw]) -> (out, in[, kh, kw])
        delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
        return (self.scale * self.alpha / self.rank) * delta

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


def innermost(module: nn.Module) -> nn.Module:
    """The original layer under any number of stacked LoRAs."""
    while isinstance(module, LoRALayer):
        module = module.base
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` is (e.g. "down.0.attn.0.blocks.0.attn1.to_q")."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model: nn.Module, name: str, rank: int, alpha: float | None = None,
                scale: float = 1.0) -> LoRALayer:
    """Wrap the layer called `name` in `model` (e.g. "down.0.attn.0.blocks.0.attn1.to_q") in a new LoRALayer."""
    layer = LoRALayer(model.get_submodule(name), rank, alpha, scale)
    replace_module(model, name, layer)
    return layer


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             targets: tuple[str, ...] = UNET_TARGETS) -> list[nn.Parameter]:
    """Freeze `model` and give every layer named like one of `targets` a fresh LoRA; returns the new parameters."""
    rank = require_int(rank, "LoRA rank", 1)                  # checked before the model is frozen or changed
    alpha = None if alpha is None else require_number(alpha, "LoRA alpha")
    names = [n for n, m in model.named_modules()
             if n.rpartition(".")[2] in targets and isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError(f"no nn.Linear or nn.Conv2d layer of {type(model).__name__} is named one of {targets}")
    model.requires_grad_(False)
    layers = [inject_lora(model, n, rank, alpha) for n in names]
    return [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The outermost LoRA wrapper at each adapted position, by its module name."""
    found: dict[str, LoRALayer] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = m
    return found


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the strength of every LoRA in `model` (0 turns them off without removing them)."""
    scale = require_scale(scale, "scale")
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.scale = scale


@torch.no_grad()
def fuse_lora(model: nn.Module) -> int:
    """Fold every LoRA into its layer's weight (W += scale * alpha / r * B A), drop the wrappers; returns how many.

    Every fused weight is computed and checked first: a LoRA whose update is NaN or infinite (a diverged training
    run), or that overflows the weights' dtype, is refused and the model is left as it was.
    """
    layers = lora_layers(model)
    fused = {}
    for name, layer in layers.items():
        base, weight = innermost(layer), innermost(layer).weight
        total = weight.float().clone()
        module = layer
        while isinstance(module, LoRALayer):     # stacked LoRAs: each adds its own update
            total += module.delta_weight().float()
            module = module.base
        total = total.to(weight.dtype)
        if not torch.isfinite(total).all():
            raise ValueError(f"cannot fuse the LoRA of {name}: the fused weight would hold NaN or infinite values "
                             f"(a diverged LoRA, or too large a scale for {weight.dtype}); nothing was fused")
        fused[name] = (base, total)
    for name, (base, total) in fused.items():
        base.weight.copy_(total)
        replace_module(model, name, base)
    return len(layers)


def unload_lora(model: nn.Module) -> int:
    """Put back the original layers (the LoRAs are discarded); returns how many positions were adapted."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, innermost(layer))
    return len(layers)
