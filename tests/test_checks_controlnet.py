"""The checks of notebook 15 (ControlNet) pass the right answers, name the known mistakes, and point to the hints
for a wrong answer they do not know."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd.course.checks import check_controlled_unet, check_controlnet_loss, check_shape_iou, check_zero_conv
from tests.check_helpers import program_text, rejects, rejects_unrecognised


# --- right answers, written here from the paper's definitions --------------------------------------------------

def zero_conv(channels):
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    return conv


def controlled_unet(unet, controlnet, latent, context, t, control, scale):
    skips_res, mid_res = controlnet(latent, context, t, control, scale)
    return unet(latent, context, t, down_residuals=skips_res, mid_residual=mid_res)


def controlnet_loss(unet, controlnet, z0, context, control, alphas_cumprod, generator, *, order="t_first",
                    use_net=True, no_grad_unet=False, factor=1.0):
    b = z0.shape[0]
    if order == "t_first":
        t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
    else:
        eps = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    ab = alphas_cumprod[t][:, None, None, None]
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    if not use_net:
        pred = unet(z_t, context, t)
    elif no_grad_unet:
        with torch.no_grad():
            pred = controlled_unet(unet, controlnet, z_t, context, t, control, 1.0)
    else:
        pred = controlled_unet(unet, controlnet, z_t, context, t, control, 1.0)
    return factor * ((pred - eps) ** 2).mean()


def shape_iou(images, colours, backgrounds, masks, *, kind="iou"):
    d_fg = ((images - colours[..., None, None]) ** 2).sum(dim=1)
    d_bg = ((images - backgrounds[..., None, None]) ** 2).sum(dim=1)
    drawn = d_fg < d_bg
    inter = (drawn & masks).sum(dim=(1, 2)).float()
    union = (drawn | masks).sum(dim=(1, 2)).float()
    if kind == "nan":
        return inter / union
    if kind == "dice":
        total = drawn.sum(dim=(1, 2)).float() + masks.sum(dim=(1, 2)).float()
        return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return iou ** 2 if kind == "squared" else iou


def test_right_answers_pass(capsys):
    assert check_zero_conv(zero_conv)
    assert check_controlled_unet(controlled_unet)
    assert check_controlnet_loss(controlnet_loss)
    assert check_shape_iou(shape_iou)
    assert capsys.readouterr().out.count("✅") == 4


# --- 15.1 -------------------------------------------------------------------------------------------------------

def test_zero_conv_check_names_a_wide_kernel_a_random_bias_and_frozen_weights():
    def wide(c):
        conv = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def random_bias(c):
        conv = nn.Conv2d(c, c, 1)
        nn.init.zeros_(conv.weight)
        return conv

    def frozen(c):
        return zero_conv(c).requires_grad_(False)

    rejects(check_zero_conv, wide, "1 × 1")
    rejects(check_zero_conv, random_bias, "the bias is not zero")
    rejects(check_zero_conv, lambda c: nn.Conv2d(c, c, 1), "neither the weight nor the bias is zero")
    rejects(check_zero_conv, frozen, "frozen")


def test_zero_conv_check_rejects_an_unknown_wrong_answer_with_a_pointer_to_the_hints():
    rejects_unrecognised(check_zero_conv, lambda c: nn.Linear(c, c), "15.1")


# --- 15.2 -------------------------------------------------------------------------------------------------------

def test_controlled_unet_check_names_a_missing_middle_a_double_scale_and_no_control():
    def no_mid(unet, net, latent, context, t, control, scale):
        down, _ = net(latent, context, t, control, scale)
        return unet(latent, context, t, down_residuals=down)

    def twice(unet, net, latent, context, t, control, scale):
        down, mid = net(latent, context, t, control, scale)
        return unet(latent, context, t, down_residuals=[scale * d for d in down], mid_residual=scale * mid)

    rejects(check_controlled_unet, no_mid, "middle block's residual is missing")
    rejects(check_controlled_unet, twice, "scaled twice")
    rejects(check_controlled_unet, lambda unet, net, latent, context, t, control, scale: unet(latent, context, t),
            "not added at all")


def test_controlled_unet_check_rejects_an_unknown_wrong_answer_with_a_pointer_to_the_hints():
    def doubled(unet, net, latent, context, t, control, scale):
        return 2 * controlled_unet(unet, net, latent, context, t, control, scale)

    rejects_unrecognised(check_controlled_unet, doubled, "15.2")


# --- 15.3 -------------------------------------------------------------------------------------------------------

def test_controlnet_loss_check_names_the_draw_order_the_plain_unet_and_a_unet_without_gradients():
    rejects(check_controlnet_loss, lambda *a: controlnet_loss(*a, order="noise_first"), "drawn before the timesteps")
    rejects(check_controlnet_loss, lambda *a: controlnet_loss(*a, use_net=False), "no gradient", "plain UNet")
    message = rejects(check_controlnet_loss, lambda *a: controlnet_loss(*a, no_grad_unet=True), "gradients on")
    assert program_text(message) is None


def test_controlnet_loss_check_rejects_an_unknown_wrong_answer_with_a_pointer_to_the_hints():
    rejects_unrecognised(check_controlnet_loss, lambda *a: controlnet_loss(*a, factor=3.0), "15.3")


# --- 15.4 -------------------------------------------------------------------------------------------------------

def test_shape_iou_check_names_dice_an_empty_union_and_swapped_colours():
    rejects(check_shape_iou, lambda *a: shape_iou(*a, kind="dice"), "Dice")
    rejects(check_shape_iou, lambda *a: shape_iou(*a, kind="nan"), "0 / 0")
    rejects(check_shape_iou, lambda images, fg, bg, masks: shape_iou(images, bg, fg, masks), "swapped")


def test_shape_iou_check_rejects_an_unknown_wrong_answer_with_a_pointer_to_the_hints():
    rejects_unrecognised(check_shape_iou, lambda *a: shape_iou(*a, kind="squared"), "15.4")
