"""The checks of notebook 14 (SD3 in miniature) pass right answers and reject the typical mistakes, naming them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd.attention import explicit_attention
from sd.course.checks.transformer import (check_adaln_zero, check_final_layer, check_joint_attention, check_patchify,
                                          check_unpatchify, reference_adaln_zero)
from sd.mmdit_blocks import FinalLayer, Modulation, Stream, joint_attention, patchify, unpatchify
from check_helpers import rejects, rejects_unrecognised


# --- 14.1 patchify and unpatchify -----------------------------------------------------------------------------

def loop_patchify(latent, p):
    """Token by token, number by number: the order the exercise states, written without any reshape."""
    b, c, h, w = latent.shape
    tokens = []
    for row in range(h // p):
        for col in range(w // p):
            tokens.append(torch.stack([latent[:, ch, row * p + i, col * p + j]
                                       for i in range(p) for j in range(p) for ch in range(c)], dim=-1))
    return torch.stack(tokens, dim=1)


def loop_unpatchify(tokens, p, h, w):
    b, n, d = tokens.shape
    c = d // (p * p)
    out = torch.zeros(b, c, h, w)
    for k in range(n):
        row, col = divmod(k, w // p)
        for m in range(d):
            i, rest = divmod(m, p * c)
            j, ch = divmod(rest, c)
            out[:, ch, row * p + i, col * p + j] = tokens[:, k, m]
    return out


def test_patchify_checks_pass_a_loop_written_from_the_stated_order_and_the_package(capsys):
    assert check_patchify(loop_patchify) and check_patchify(patchify)
    assert check_unpatchify(loop_unpatchify) and check_unpatchify(unpatchify)
    assert "check_patchify passed" in capsys.readouterr().out


def test_the_package_patchify_and_unpatchify_are_inverse_and_keep_a_patch_together():
    latent = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(latent, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 4, 6), latent)
    # token 1 is the patch in the first row, second column: latent pixels rows 0-1, columns 2-3
    assert torch.equal(tokens[0, 1].reshape(2, 2, 3).permute(2, 0, 1), latent[0, :, 0:2, 2:4])


def test_patchify_check_names_the_plain_reshape_column_order_and_channel_first():
    def plain(latent, p):
        b, c, h, w = latent.shape
        return latent.reshape(b, (h // p) * (w // p), p * p * c)

    def column_major(latent, p):
        b, c, h, w = latent.shape
        x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 4, 2, 3, 5, 1)
        return x.reshape(b, -1, p * p * c)

    def channel_first(latent, p):
        b, c, h, w = latent.shape
        return F.unfold(latent, kernel_size=p, stride=p).transpose(1, 2)     # (B, N, C p p)

    rejects(check_patchify, plain, "a plain reshape mixes numbers")
    rejects(check_patchify, column_major, "column by column")
    rejects(check_patchify, channel_first, "the channels come first")
    rejects_unrecognised(check_patchify, lambda latent, p: 2 * patchify(latent, p), "14.1")


def test_unpatchify_check_names_an_unpatchify_that_is_not_the_inverse():
    def plain(tokens, p, h, w):
        return tokens.reshape(tokens.shape[0], -1, h, w)

    def channel_first(tokens, p, h, w):
        return F.fold(tokens.transpose(1, 2), (h, w), kernel_size=p, stride=p)

    rejects(check_unpatchify, plain, "not the inverse of patchify: it undoes a plain reshape")
    rejects(check_unpatchify, channel_first, "channel first")
    rejects_unrecognised(check_unpatchify, lambda t, p, h, w: unpatchify(t, p, h, w).flip(-1), "14.1")


# --- 14.2 the adaLN-zero half-block ---------------------------------------------------------------------------

def hand_adaln(x, sublayer, shift, scale, gate):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-6)
    return x + gate.unsqueeze(1) * sublayer(normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


def test_adaln_check_passes_a_hand_written_half_block_and_it_equals_the_streams_mlp_half(capsys):
    assert check_adaln_zero(hand_adaln) and check_adaln_zero(reference_adaln_zero)
    assert "check_adaln_zero passed" in capsys.readouterr().out
    # the package's stream, with random modulation weights: its MLP half is this half-block
    torch.manual_seed(0)
    stream = Stream(8, 2.0)
    nn.init.normal_(stream.modulation.linear.weight)
    x, attended, cond = torch.randn(2, 5, 8), torch.zeros(2, 5, 8), torch.randn(2, 8)
    nn.init.zeros_(stream.out.weight), nn.init.zeros_(stream.out.bias)     # no attention term: x stays x
    _, mods = stream.pre_attention(x, cond)
    gate_a, shift_m, scale_m, gate_m = mods
    expected = stream.post_attention(x, attended, mods)
    assert torch.allclose(hand_adaln(x, stream.mlp, shift_m, scale_m, gate_m), expected, atol=1e-5)


def test_adaln_check_names_scale_without_one_the_missing_gate_the_wrong_gate_and_the_missing_residual():
    def modulated(x, shift, scale, one=1.0):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (one + scale[:, None]) + shift[:, None]

    def scale_only(x, sublayer, shift, scale, gate):
        return x + gate[:, None] * sublayer(modulated(x, shift, scale, one=0.0))

    def no_gate(x, sublayer, shift, scale, gate):
        return x + sublayer(modulated(x, shift, scale))

    def gate_on_input(x, sublayer, shift, scale, gate):
        return gate[:, None] * x + sublayer(modulated(x, shift, scale))

    def no_residual(x, sublayer, shift, scale, gate):
        return gate[:, None] * sublayer(modulated(x, shift, scale))

    rejects(check_adaln_zero, scale_only, "scale instead of 1 + scale")
    rejects(check_adaln_zero, no_gate, "must return its input unchanged", "there is no gate")
    rejects(check_adaln_zero, gate_on_input, "the gate multiplies the residual")
    rejects(check_adaln_zero, no_residual, "the residual is missing")


def test_adaln_check_sees_a_detached_gate_and_an_unknown_mistake():
    def detached(x, sublayer, shift, scale, gate):
        return hand_adaln(x, sublayer, shift.detach(), scale.detach(), gate.detach())

    rejects(check_adaln_zero, detached, "the gradient must still reach the modulation layer")
    rejects_unrecognised(check_adaln_zero, lambda x, s, sh, sc, g: hand_adaln(x, s, sh, sc, 2 * g), "14.2")


# --- 14.3 joint attention -------------------------------------------------------------------------------------

def hand_joint(image_qkv, text_qkv, heads):
    """Per head, with an explicit softmax, tokens concatenated text first (the order does not matter)."""
    qkv = torch.cat([text_qkv, image_qkv], dim=1)
    b, length, three_d = qkv.shape
    d_model = three_d // 3
    q, k, v = qkv[..., :d_model], qkv[..., d_model:2 * d_model], qkv[..., 2 * d_model:]
    d = d_model // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (m[..., h * d:(h + 1) * d] for m in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
        outs.append(weights @ vh)
    out = torch.cat(outs, dim=-1)
    t = text_qkv.shape[1]
    return out[:, t:], out[:, :t]


def test_joint_attention_check_passes_a_per_head_loop_and_the_package(capsys):
    assert check_joint_attention(hand_joint) and check_joint_attention(joint_attention)
    assert "check_joint_attention passed" in capsys.readouterr().out


def split(qkv, heads):
    b, length, three_d = qkv.shape
    return qkv.reshape(b, length, 3, heads, three_d // 3 // heads).permute(2, 0, 3, 1, 4)


def merge(out):
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def test_joint_attention_check_names_self_only_cross_attention_unsplit_heads_and_the_merge_order():
    def self_only(image_qkv, text_qkv, heads):
        return tuple(merge(explicit_attention(*split(x, heads))) for x in (image_qkv, text_qkv))

    def cross(image_qkv, text_qkv, heads):
        q, _, _ = split(image_qkv, heads)
        _, k, v = split(text_qkv, heads)
        return merge(explicit_attention(q, k, v)), merge(explicit_attention(*split(text_qkv, heads)))

    def one_head(image_qkv, text_qkv, heads):
        return joint_attention(image_qkv, text_qkv, 1)

    def merge_order(image_qkv, text_qkv, heads):
        n = image_qkv.shape[1]
        q, k, v = split(torch.cat([image_qkv, text_qkv], dim=1), heads)
        out = explicit_attention(q, k, v)
        out = out.reshape(out.shape[0], out.shape[2], -1)
        return out[:, :n], out[:, n:]

    rejects(check_joint_attention, self_only, "each modality attends only to itself")
    rejects(check_joint_attention, cross, "cross-attention, as in the UNet")
    rejects(check_joint_attention, one_head, "the heads are not split")
    rejects(check_joint_attention, merge_order, "merged back in the wrong order")
    rejects_unrecognised(check_joint_attention,
                         lambda i, t, h: tuple(0.5 * o for o in joint_attention(i, t, h)), "14.3")


# --- 14.4 the final layer -------------------------------------------------------------------------------------

class HandFinal(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.modulation = Modulation(dim, 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, cond):
        shift, scale = self.modulation(cond)
        return self.linear(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


def test_final_layer_check_passes_a_hand_written_layer_and_the_package(capsys):
    assert check_final_layer(HandFinal) and check_final_layer(FinalLayer)
    assert "check_final_layer passed" in capsys.readouterr().out


def test_final_layer_check_names_a_layer_that_does_not_start_at_zero_and_scale_without_one():
    class NotZero(HandFinal):
        def __init__(self, dim, patch_size, out_channels):
            super().__init__(dim, patch_size, out_channels)
            self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)   # PyTorch's default init

    class ScaleOnly(HandFinal):
        def forward(self, x, cond):
            shift, scale = self.modulation(cond)
            return self.linear(self.norm(x) * scale[:, None] + shift[:, None])

    class Doubled(HandFinal):
        def forward(self, x, cond):
            return 2 * super().forward(x, cond)

    rejects(check_final_layer, NotZero, "not zero-initialised")
    rejects(check_final_layer, ScaleOnly, "scale instead of 1 + scale")
    rejects_unrecognised(check_final_layer, Doubled, "14.4")
