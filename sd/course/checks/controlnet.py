"""Checks for notebook 15 (ControlNet): the zero convolution (15.1), the UNet's forward with the ControlNet's
residuals added (15.2), the ControlNet's training loss (15.3) and the IoU of a drawn shape with its mask (15.4).

The references are `sd.controlnet` (the ControlNet, tested against diffusers' ControlNetModel in
tests/test_controlnet.py), `sd.unet.DiffusionUNET.forward`'s `down_residuals`/`mid_residual`, and
`sd.training.controlnet` (`drawn_shape`, `mask_iou`). The checks build a small UNet and a ControlNet copied from it
whose zero convolutions are given random weights (at zero every residual is zero and a missing one would not show).
The `Mistake`s recompute the typical wrong ways: the middle or the skip residuals left out, the scale applied twice
or not at all, the noise drawn before the timesteps, the plain UNet in the loss, the Dice score or the pixel
accuracy instead of the IoU. Every message is in words: the answer's code is only printed by `solution()`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import UNetConfig
from ...controlnet import ControlNet
from ...diffusion import DiffusionScheduler
from ...training.controlnet import mask_iou
from ...unet import DiffusionUNET
from .common import (Case, Mistake, _crash_line, _kind, _more_help, _unknown_mistake, check_function, randn,
                     require_callable, seeded)

# A small UNet and ControlNet of SD's structure: 2 levels, attention on the second, control images 2x the latent.
_UNET = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), heads=2,
                   context_dim=8, norm_groups=8, sample_size=4)
_EMBEDDING = (4, 8)               # one halving: control images twice the latent's side
_ZERO_CONV_STD = 0.1              # the checks' zero convolutions get random weights of this size
_MODEL_SEED = 150


def _models() -> tuple[DiffusionUNET, ControlNet]:
    """The check's frozen UNet and a ControlNet copied from it, zero convolutions made non-zero."""
    with seeded(_MODEL_SEED):
        unet = DiffusionUNET(_UNET).eval().requires_grad_(False)
        net = ControlNet.from_unet(unet, embedding_channels=_EMBEDDING).eval()
        for name, p in net.named_parameters():          # the zero convs and the embedding's last conv
            if name.startswith(("zero_convs.", "mid_zero_conv.", "cond_embedding.conv_out.")):
                p.data.normal_(0, _ZERO_CONV_STD)
    return unet, net


def _inputs(batch: int, seed: int) -> dict:
    with seeded(seed):
        latent = randn(batch, 4, 4, 4)
        context = randn(batch, 3, _UNET.context_dim)
        control = torch.rand(batch, 3, 8, 8)
    return {"latent": latent, "context": context, "control": control}


# ----------------------------------------------------------------------------------------------------------
# Exercise 15.1: the zero convolution
# ----------------------------------------------------------------------------------------------------------

def check_zero_conv(fn) -> bool:
    """Exercise 15.1: fn(channels) -> a 1 x 1 convolution from channels to channels whose weight and bias start at
    zero, still trainable."""
    name, exercise = "check_zero_conv", "15.1"
    require_callable(name, fn)
    for channels in (5, 32):
        try:
            conv = fn(channels)
        except NotImplementedError:
            raise
        except Exception as e:
            raise AssertionError(f"{name}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                 + _more_help(exercise)) from e
        where = f"{name} failed for {channels} channels"
        if not isinstance(conv, nn.Conv2d):
            raise AssertionError(f"{where}: expected a 2D convolution layer, got a {type(conv).__name__}"
                                 + _unknown_mistake(exercise))
        if tuple(conv.kernel_size) != (1, 1):
            raise AssertionError(f"{where}: the kernel is {tuple(conv.kernel_size)}: a zero convolution is 1 × 1, "
                                 "it mixes the channels of each position and looks at no neighbours (section 3.1)"
                                 + _more_help(exercise))
        if (conv.in_channels, conv.out_channels) != (channels, channels):
            raise AssertionError(f"{where}: it maps {conv.in_channels} to {conv.out_channels} channels; it must "
                                 f"keep the width, {channels} to {channels}, so that its output can be added to "
                                 "the UNet's feature map of that width" + _more_help(exercise))
        if tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0) or conv.groups != 1:
            raise AssertionError(f"{where}: keep the stride 1, no padding and one group, so the output has the "
                                 "input's size and every channel sees every channel" + _more_help(exercise))
        if conv.bias is None:
            raise AssertionError(f"{where}: the convolution has no bias; the reference code's zero convolutions "
                                 "keep theirs, set to zero like the weight" + _more_help(exercise))
        weight_zero, bias_zero = bool((conv.weight == 0).all()), bool((conv.bias == 0).all())
        if not weight_zero or not bias_zero:
            which = ("neither the weight nor the bias is" if not (weight_zero or bias_zero) else
                     "the weight is not" if not weight_zero else "the bias is not")
            raise AssertionError(f"{where}: {which} zero. A new convolution starts with small random numbers; "
                                 "both must start at zero, so that the ControlNet adds nothing before training"
                                 + _more_help(exercise))
        if not (conv.weight.requires_grad and conv.bias.requires_grad):
            raise AssertionError(f"{where}: the weights are frozen; a zero convolution starts at zero but is "
                                 "trained like every other layer of the ControlNet" + _more_help(exercise))
        # behaviour: zero out, yet a gradient reaches the weight (d(Wx + b)/dW = x), and none the input
        with seeded(151):
            x = randn(2, channels, 3, 3).requires_grad_(True)
            upstream = randn(2, channels, 3, 3)
        y = conv(x)
        (y * upstream).sum().backward()
        if float(y.detach().abs().max()) != 0 or conv.weight.grad is None or float(conv.weight.grad.abs().max()) == 0:
            raise AssertionError(f"{where}: its output should be zero and its weight should still get a gradient; "
                                 "use a plain convolution layer" + _unknown_mistake(exercise))
    print(f"✅ {name} passed: a 1 × 1 convolution, weight and bias zero, output zero, and its weight gets a "
          "gradient (the input's features)")
    return True


# ----------------------------------------------------------------------------------------------------------
# Exercise 15.2: the residual injection
# ----------------------------------------------------------------------------------------------------------

def reference_controlled_unet(unet, controlnet, latent, context, t, control, scale):
    """The UNet's noise prediction with the ControlNet's residuals (times scale) added to its skips and middle."""
    down, mid = controlnet(latent, context, t, control, scale)
    return unet(latent, context, t, down_residuals=down, mid_residual=mid)


def _injection_mistake(kind: str):
    def compute(ref, case):
        unet, net = case.inputs["unet"], case.inputs["controlnet"]
        latent, context, t = case.inputs["latent"], case.inputs["context"], case.inputs["t"]
        control, scale = case.inputs["control"], case.inputs["scale"]
        down, mid = net(latent, context, t, control, scale)
        if kind == "no_mid":
            return unet(latent, context, t, down_residuals=down)
        if kind == "no_skips":
            return unet(latent, context, t, mid_residual=mid)
        if kind == "twice":
            return unet(latent, context, t, down_residuals=[d * scale for d in down], mid_residual=mid * scale)
        if kind == "unscaled":
            down, mid = net(latent, context, t, control, 1.0)
            return unet(latent, context, t, down_residuals=down, mid_residual=mid)
        if kind == "none":
            return unet(latent, context, t)
        raise ValueError(kind)
    return compute


def check_controlled_unet(fn) -> bool:
    """Exercise 15.2: fn(unet, controlnet, latent, context, t, control, scale) -> the UNet's noise prediction with
    the ControlNet's 12 (here 4) skip residuals and its middle residual added, each times scale."""
    unet, net = _models()
    cases = []
    for i, (batch, t, scale) in enumerate([(2, 500, 1.0), (3, 37, 0.5)]):
        x = _inputs(batch, 152 + i)
        cases.append(Case({"unet": unet, "controlnet": net, "latent": x["latent"], "context": x["context"], "t": t,
                           "control": x["control"], "scale": scale}))
    mistakes = [
        Mistake("the middle block's residual is missing: the ControlNet returns one residual per skip AND one for "
                "the middle block's output", _injection_mistake("no_mid")),
        Mistake("the skips get no residuals: each skip the down path keeps gets the ControlNet's residual of the "
                "same shape, in the same order", _injection_mistake("no_skips")),
        Mistake("the residuals are scaled twice: the ControlNet already multiplies them by the scale you give it",
                _injection_mistake("twice")),
        Mistake("the scale is ignored: the residuals are multiplied by the conditioning scale (0.5 in one case)",
                _injection_mistake("unscaled")),
        Mistake("the ControlNet's residuals are not added at all: the result is the plain UNet's prediction",
                _injection_mistake("none")),
    ]
    return check_function("check_controlled_unet", fn, reference_controlled_unet, cases, mistakes,
                          hint="run the ControlNet once, then the UNet's forward: its down path keeps every skip; "
                               "add the residuals to the skips, and the middle residual after the middle block",
                          reference_name="the UNet with the ControlNet's residuals (sd.unet, sd.controlnet)",
                          exercise="15.2")


# ----------------------------------------------------------------------------------------------------------
# Exercise 15.3: the ControlNet's training loss
# ----------------------------------------------------------------------------------------------------------

def reference_controlnet_loss(unet, controlnet, z0, context, control, alphas_cumprod, generator):
    """SD's eps loss through the frozen UNet steered by the ControlNet: t, then eps, from the generator."""
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=generator).to(z0.device)   # (B,)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device)
    a = alphas_cumprod.to(z0.device)[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps                    # Ho et al. 2020, eq. 4
    return F.mse_loss(reference_controlled_unet(unet, controlnet, z_t, context, t, control, 1.0), eps)


def _loss_mistake(kind: str):
    def compute(ref, case):
        unet, net = case.inputs["unet"], case.inputs["controlnet"]
        z0, context, control = case.inputs["z0"], case.inputs["context"], case.inputs["control"]
        alphas = case.inputs["alphas_cumprod"]
        generator = torch.Generator().manual_seed(int(case.inputs["seed"]))
        if kind == "noise_first":
            eps = torch.randn(z0.shape, generator=generator)
            t = torch.randint(0, len(alphas), (z0.shape[0],), generator=generator)
        else:
            t = torch.randint(0, len(alphas), (z0.shape[0],), generator=generator)
            eps = torch.randn(z0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        if kind == "plain_unet":
            pred = unet(z_t, context, t)
        elif kind == "control_on_z0":
            down, mid = net(z0, context, t, control)
            pred = unet(z_t, context, t, down_residuals=down, mid_residual=mid)
        else:
            pred = reference_controlled_unet(unet, net, z_t, context, t, control, 1.0)
        if kind == "x0_target":
            return F.mse_loss(pred, z0)
        if kind == "sum":
            return ((pred - eps) ** 2).sum()
        return F.mse_loss(pred, eps)
    return compute


def _loss_cases() -> list[Case]:
    unet, net = _models()
    alphas = DiffusionScheduler().alphas_cumprod.float()
    cases = []
    for i, batch in enumerate((3, 2)):
        inputs = _inputs(batch, 156 + i)
        cases.append(Case({"unet": unet, "controlnet": net, "z0": inputs["latent"], "context": inputs["context"],
                           "control": inputs["control"], "alphas_cumprod": alphas, "seed": 1560 + i}))
    return cases


def _require_loss_behaviour(fn, exercise: str) -> None:
    """The loss's gradient reaches the ControlNet (through the frozen UNet); the loss uses only its generator."""
    case = _loss_cases()[0]
    unet, net = _models()
    net.train()
    args = [unet, net, case.inputs["z0"], case.inputs["context"], case.inputs["control"],
            case.inputs["alphas_cumprod"]]
    loss = fn(*args, torch.Generator().manual_seed(5))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise AssertionError(f"check_controlnet_loss: the loss should be a single number (a 0-dimensional tensor), "
                             f"got {_kind(loss)}" + _unknown_mistake(exercise))
    if not loss.requires_grad:
        raise AssertionError("check_controlnet_loss: the loss carries no gradient back to the ControlNet. Either "
                             "the prediction is the plain UNet's (the ControlNet's residuals must be added, your "
                             "exercise 15.2), or the UNet ran with gradients off: the residuals reach the loss "
                             "through the frozen UNet, so its forward must run with gradients on (its weights are "
                             "frozen, not its computation)" + _more_help(exercise))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if n.startswith(("zero_convs", "mid_zero_conv"))
               and (p.grad is None or float(p.grad.abs().max()) == 0)]
    if missing:
        raise AssertionError(f"check_controlnet_loss: {len(missing)} of the ControlNet's zero convolutions get no "
                             "gradient: every residual must enter the UNet's prediction" + _more_help(exercise))
    torch.manual_seed(1)
    first = fn(*args, torch.Generator().manual_seed(5)).item()
    torch.manual_seed(2)
    second = fn(*args, torch.Generator().manual_seed(5)).item()
    if first != second:
        raise AssertionError("check_controlnet_loss: two calls with the same generator gave different losses: draw "
                             "the timesteps and the noise from the generator you are given, not from torch's global "
                             "random numbers" + _more_help(exercise))


def check_controlnet_loss(fn) -> bool:
    """Exercise 15.3: fn(unet, controlnet, z0, context, control, alphas_cumprod, generator) -> SD's noise-prediction
    loss with the ControlNet steering the frozen UNet (conditioning scale 1)."""
    exercise = "15.3"
    require_callable("check_controlnet_loss", fn)
    _require_loss_behaviour(fn, exercise)
    mistakes = [
        Mistake("the noise is drawn before the timesteps: draw t first, then the noise, both from the generator, "
                "so the draws match the reference's", _loss_mistake("noise_first")),
        Mistake("the prediction is the plain UNet's: the ControlNet's residuals must be added (your exercise 15.2)",
                _loss_mistake("plain_unet")),
        Mistake("the ControlNet sees the clean latent: like the UNet, it reads the noisy latent z_t (and the same "
                "t), since at sampling time there is no clean latent", _loss_mistake("control_on_z0")),
        Mistake("the target is the clean latent: the UNet predicts the noise ε, so compare with ε",
                _loss_mistake("x0_target")),
        Mistake("the squared errors are summed: take their mean over the batch and every latent element",
                _loss_mistake("sum")),
    ]
    return check_function("check_controlnet_loss", lambda unet, controlnet, z0, context, control, alphas_cumprod,
                          seed: fn(unet, controlnet, z0, context, control, alphas_cumprod,
                                   torch.Generator().manual_seed(int(seed))),
                          lambda unet, controlnet, z0, context, control, alphas_cumprod, seed:
                          reference_controlnet_loss(unet, controlnet, z0, context, control, alphas_cumprod,
                                                    torch.Generator().manual_seed(int(seed))),
                          _loss_cases(), mistakes,
                          hint="draw t and then the noise from the generator, noise z0 to z_t with the schedule, "
                               "predict the noise with your controlled UNet of exercise 15.2 and take the mean "
                               "squared error",
                          reference_name="the ControlNet's training loss (sd.training.controlnet)", exercise=exercise)


# ----------------------------------------------------------------------------------------------------------
# Exercise 15.4: the IoU of the drawn shape with the mask
# ----------------------------------------------------------------------------------------------------------

def reference_shape_iou(images, colours, backgrounds, masks):
    """(B,) IoU of the pixels nearer the shape's colour than the background's with the mask (1 for two empties)."""
    near_shape = ((images - colours[:, :, None, None]) ** 2).sum(1)           # (B, H, W)
    near_background = ((images - backgrounds[:, :, None, None]) ** 2).sum(1)
    return mask_iou(near_shape < near_background, masks)


def _iou_mistake(kind: str):
    def compute(ref, case):
        images, fg, bg, masks = (case.inputs[k] for k in ("images", "colours", "backgrounds", "masks"))
        d_fg = ((images - fg[:, :, None, None]) ** 2).sum(1)
        d_bg = ((images - bg[:, :, None, None]) ** 2).sum(1)
        drawn = d_fg > d_bg if kind == "inverted" else d_fg < d_bg
        a, b = drawn.flatten(1).float(), masks.flatten(1).float()
        inter, union = (a * b).sum(1), ((a + b) > 0).float().sum(1)
        if kind == "dice":
            return torch.where(a.sum(1) + b.sum(1) > 0, 2 * inter / (a.sum(1) + b.sum(1)).clamp(min=1),
                               torch.ones_like(inter))
        if kind == "accuracy":
            return (a == b).float().mean(1)
        if kind == "recall":
            return inter / b.sum(1)
        if kind == "nan":
            return inter / union
        return mask_iou(drawn, masks)
    return compute


def _iou_cases() -> list[Case]:
    cases = []
    for i in range(2):
        with seeded(158 + i):
            b, side = 5, 12
            fg, bg = torch.rand(b, 3), torch.rand(b, 3)
            masks = torch.zeros(b, side, side, dtype=torch.bool)
            for k in range(b):                                        # a random rectangle each, the last one empty
                if k < b - 1 or i == 0:
                    y, x = torch.randint(0, side - 4, (2,)).tolist()
                    h, w = torch.randint(2, 6, (2,)).tolist()
                    masks[k, y:y + h, x:x + w] = True
            drawn = masks.roll(shifts=(1, 2), dims=(1, 2))             # the "generated" shape, shifted
            pixels = torch.where(drawn[:, None], fg[:, :, None, None], bg[:, :, None, None])
            images = (pixels + 0.15 * randn(b, 3, side, side)).clamp(0, 1)
        cases.append(Case({"images": images, "colours": fg, "backgrounds": bg, "masks": masks}))
    return cases


def check_shape_iou(fn) -> bool:
    """Exercise 15.4: fn(images (B, 3, H, W) in [0, 1], colours (B, 3), backgrounds (B, 3), masks (B, H, W) bool)
    -> (B,) the IoU of each picture's shape pixels (nearer its colour than its background's) with its mask."""
    mistakes = [
        Mistake("the shape and the background are swapped: a pixel is the shape's when it is NEARER the shape's "
                "colour than the background's", _iou_mistake("inverted")),
        Mistake("this is the Dice score, twice the intersection over the sum of the two areas: the IoU divides the "
                "intersection by the union", _iou_mistake("dice")),
        Mistake("this is the share of pixels on which the two agree (the accuracy): the IoU ignores the pixels "
                "that are background in both, it divides the intersection by the union", _iou_mistake("accuracy")),
        Mistake("the intersection is divided by the mask's area: that is the share of the mask that was drawn, "
                "which a picture full of the shape's colour would score 1 on; divide by the union",
                _iou_mistake("recall")),
        Mistake("a picture with no shape and an empty mask gives 0 / 0: count an empty union as a perfect match, 1",
                _iou_mistake("nan")),
    ]
    return check_function("check_shape_iou", fn, reference_shape_iou, _iou_cases(), mistakes,
                          hint="per pixel, compare the squared distances to the two colours; then the pixels in "
                               "both sets over the pixels in either, per picture",
                          reference_name="the IoU of sd.training.controlnet", exercise="15.4")
