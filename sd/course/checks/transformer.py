"""Checks for notebook 14 (SD3 in miniature): patchify and unpatchify, the adaLN-zero half-block, joint attention
over text and image tokens, and the final layer of a multimodal diffusion transformer (MMDiT).

The references are `sd.mmdit_blocks` (the package's transformer, sd/mmdit.py, is built from them). The `Mistake`s
recompute them the typical wrong ways (a plain reshape without the permutation, scale instead of 1 + scale, each
modality attending only to itself, heads not split, a final layer that does not start at zero, ...), so a wrong
answer is named in words, never as code. Two checks also look at behaviour: with zero modulations the half-block
returns its input and the gradient still reaches the modulation layer; a fresh final layer predicts zero.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch
import torch.nn.functional as F

from ...attention import explicit_attention
from ...mmdit_blocks import (NORM_EPS, FeedForward, FinalLayer, Modulation, joint_attention, modulate, patchify,
                             unpatchify)
from .common import (Case, Mistake, _unknown_mistake, build_learner_module, check_function, check_module, randn,
                     require_callable, seeded)

# Three vectors per half-block (shift, scale, gate), as each of the two halves of an MMDiT block uses.
HALF_BLOCK_MODULATIONS = 3

# ----------------------------------------------------------------------------------------------------------
# Exercise 14.1: patchify and unpatchify
# ----------------------------------------------------------------------------------------------------------

# Where each axis of (B, C, H/p, p, W/p, p) goes, for patchify's right order and its typical wrong ones.
_ORDERS = {
    "right": (0, 2, 4, 3, 5, 1),            # (B, H/p, W/p, p, p, C): rows of patches, then in-patch row, column, channel
    "column_major": (0, 4, 2, 3, 5, 1),     # patches column by column
    "channel_first": (0, 2, 4, 1, 3, 5),    # (C, p, p) inside a patch
    "in_patch_transposed": (0, 2, 4, 5, 3, 1),   # column in patch before row in patch
}


def _patchify(latent: torch.Tensor, p: int, order: str) -> torch.Tensor:
    """patchify with the axes laid out as `order` says, or a plain reshape ("reshape")."""
    b, c, h, w = latent.shape
    if order == "reshape":
        return latent.reshape(b, (h // p) * (w // p), p * p * c)
    x = latent.reshape(b, c, h // p, p, w // p, p).permute(*_ORDERS[order])
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _unpatchify(tokens: torch.Tensor, p: int, h: int, w: int, order: str) -> torch.Tensor:
    """The inverse of `_patchify(.., order)`: which wrong patchify an unpatchify undoes."""
    b, n, d = tokens.shape
    c = d // (p * p)
    if order == "reshape":
        return tokens.reshape(b, c, h, w)
    perm = _ORDERS[order]
    sizes = (b, c, h // p, p, w // p, p)
    x = tokens.reshape(*[sizes[i] for i in perm])                 # the permuted layout
    inverse = [perm.index(i) for i in range(6)]
    return x.permute(*inverse).reshape(b, c, h, w)


def _patchify_cases() -> list[Case]:
    with seeded(140):
        return [Case({"latent": randn(2, 4, 6, 8), "p": 2}),
                Case({"latent": randn(1, 3, 6, 9), "p": 3}),
                Case({"latent": randn(2, 4, 3, 5), "p": 1})]


def check_patchify(fn) -> bool:
    """Exercise 14.1: fn(latent (B, C, H, W), p) -> (B, (H/p)(W/p), p*p*C) patch tokens in reading order."""
    def wrong(order):
        return lambda ref, case: _patchify(*case.inputs.values(), order)

    mistakes = [
        Mistake("a plain reshape mixes numbers from different patches into one token: first split each side into "
                "(patches, p), move the patch grid in front and the p x p x C numbers of one patch to the end, "
                "then merge", wrong("reshape")),
        Mistake("the patches come column by column: read them as text is read, row by row, so that token "
                "i = row times (patches per row) + column", wrong("column_major")),
        Mistake("inside a patch the channels come first: the numbers of one patch go row in patch, column in "
                "patch, then channel (all C channels of one latent pixel side by side)", wrong("channel_first")),
        Mistake("inside a patch the column comes before the row: the order is row in patch, column in patch, "
                "channel", wrong("in_patch_transposed")),
    ]
    return check_function("check_patchify", fn, patchify, _patchify_cases(), mistakes, exercise="14.1",
                          hint="split each side into patches of p, put the grid of patches (row by row) in front "
                               "and each patch's p x p x C numbers (row, column, channel) last",
                          reference_name="patchify of sd.mmdit_blocks")


def check_unpatchify(fn) -> bool:
    """Exercise 14.1: fn(tokens (B, (h/p)(w/p), p*p*C), p, h, w) -> (B, C, h, w), the inverse of patchify."""
    cases = [Case({"tokens": patchify(case.inputs["latent"], case.inputs["p"]), "p": case.inputs["p"],
                   "h": case.inputs["latent"].shape[2], "w": case.inputs["latent"].shape[3]})
             for case in _patchify_cases()]

    def wrong(order):
        return lambda ref, case: _unpatchify(*case.inputs.values(), order)

    mistakes = [
        Mistake("this is not the inverse of patchify: it undoes a plain reshape. Undo patchify's steps in reverse: "
                "split each token into (row in patch, column in patch, channel), put the channel first and each "
                "in-patch axis back beside its grid axis, then merge", wrong("reshape")),
        Mistake("this is not the inverse of patchify: it reads the tokens column by column, but patchify wrote "
                "them row by row", wrong("column_major")),
        Mistake("this is not the inverse of patchify: it reads a token's numbers channel first, but patchify "
                "wrote them row in patch, column in patch, channel", wrong("channel_first")),
        Mistake("this is not the inverse of patchify: it reads a token's in-patch column before its row",
                wrong("in_patch_transposed")),
    ]
    return check_function("check_unpatchify", fn, unpatchify, cases, mistakes, exercise="14.1",
                          hint="undo patchify's steps in reverse order; unpatchify of patchify gives the latent back",
                          reference_name="unpatchify of sd.mmdit_blocks")


# ----------------------------------------------------------------------------------------------------------
# Exercise 14.2: the adaLN-zero half-block
# ----------------------------------------------------------------------------------------------------------

def reference_adaln_zero(x: torch.Tensor, sublayer, shift: torch.Tensor, scale: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    """x + gate * sublayer(LayerNorm(x) (1 + scale) + shift): one half of an MMDiT stream (DiT's adaLN-zero).
    The package writes the same lines in `Stream.post_attention` (sd/mmdit_blocks.py)."""
    normed = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)                # (B, N, D), no learned affine
    return x + gate[:, None] * sublayer(modulate(normed, shift, scale))


def _adaln_mistake(kind: str):
    def compute(ref, case):
        x, sublayer, shift, scale, gate = case.inputs.values()
        normed = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
        g = gate[:, None]
        modulated = normed * (1 + scale[:, None]) + shift[:, None]
        if kind == "scale":
            return x + g * sublayer(normed * scale[:, None] + shift[:, None])
        if kind == "swapped":
            return x + g * sublayer(normed * (1 + shift[:, None]) + scale[:, None])
        if kind == "no_gate":
            return x + sublayer(modulated)
        if kind == "gate_on_residual":
            return g * x + sublayer(modulated)
        if kind == "gate_on_both":
            return g * (x + sublayer(modulated))
        if kind == "gate_inside":
            return x + sublayer(g * modulated)
        if kind == "no_residual":
            return g * sublayer(modulated)
        if kind == "normed_residual":
            return normed + g * sublayer(modulated)
        if kind == "no_norm":
            return x + g * sublayer(x * (1 + scale[:, None]) + shift[:, None])
        raise ValueError(kind)
    return compute


_ADALN_MISTAKES = [
    ("the sublayer's input is multiplied by scale instead of 1 + scale: at the start every scale is 0, so the "
     "sublayer would see no signal at all; 1 + scale starts as the plain LayerNorm", "scale"),
    ("shift and scale are exchanged: the normalised tokens are multiplied by 1 + scale and then shifted",
     "swapped"),
    ("there is no gate: the sublayer's output is added unscaled, so the block is not the identity at the start",
     "no_gate"),
    ("the gate multiplies the residual (the input) instead of the sublayer's output", "gate_on_residual"),
    ("the gate multiplies the sum; it belongs on the sublayer's output only, the input passes unchanged",
     "gate_on_both"),
    ("the gate multiplies the sublayer's input; it belongs on the sublayer's output", "gate_inside"),
    ("the residual is missing: add the gated sublayer output to the block's input", "no_residual"),
    ("the residual adds the normalised tokens; it adds the block's input as it came", "normed_residual"),
    ("the tokens are not normalised: LayerNorm over the last dimension (no learned weights) comes before the "
     "shift and scale", "no_norm"),
]


def _adaln_cases() -> list[Case]:
    cases = []
    for i, (b, n, d) in enumerate(((2, 5, 16), (3, 4, 8))):
        with seeded(142 + i):
            sublayer = FeedForward(d, 2.0).eval()
            cases.append(Case({"x": 2 * randn(b, n, d) + 0.5, "sublayer": sublayer, "shift": randn(b, d),
                               "scale": 0.5 * randn(b, d), "gate": randn(b, d)}))
    return cases


def _adaln_behaviour(fn, exercise: str) -> str | None:
    """With the shift, scale and gate of a zero-initialised modulation layer, the half-block returns its input;
    and the gradient of its output still reaches that layer (through the gate). What is wrong, or None."""
    with seeded(149):
        d = 12
        modulation = Modulation(d, HALF_BLOCK_MODULATIONS)
        sublayer = FeedForward(d, 2.0)
        x, cond, weights = randn(2, 6, d), randn(2, d), randn(2, 6, d)
    shift, scale, gate = modulation(cond)                                  # 3 x (2, d), all zero
    out = fn(x.clone(), sublayer, shift, scale, gate)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None                                                        # the numeric check says what is wrong
    change = float((out.detach() - x).abs().max())
    if change > 1e-6:
        return ("check_adaln_zero: with every modulation zero (a zero-initialised modulation layer, the start of "
                f"training) the half-block must return its input unchanged; yours changed it by up to {change:.3g}"
                + _unknown_mistake(exercise))
    if not out.requires_grad:
        return ("check_adaln_zero: the output carries no gradient: compute it from the shift, scale and gate you "
                "are given, without detaching them" + f'\n  More help: hint("{exercise}")')
    (out * weights).sum().backward()
    grad = modulation.linear.weight.grad
    if grad is None or float(grad.abs().sum()) == 0:
        return ("check_adaln_zero: at the start the gradient must still reach the modulation layer (through the "
                "gate, which multiplies the sublayer's output); yours gives it none" + f'\n  More help: hint("{exercise}")')
    return None


def check_adaln_zero(fn) -> bool:
    """Exercise 14.2: fn(x (B, N, D), sublayer, shift, scale, gate (B, D) each) -> (B, N, D), the half-block
    x + gate * sublayer(LayerNorm(x) (1 + scale) + shift)."""
    exercise = "14.2"
    require_callable("check_adaln_zero", fn)
    mistakes = [Mistake(hint, _adaln_mistake(kind)) for hint, kind in _ADALN_MISTAKES]

    def compare() -> bool:
        return check_function("check_adaln_zero", fn, reference_adaln_zero, _adaln_cases(), mistakes,
                              exercise=exercise, hint="normalise the tokens, modulate them by 1 + scale and the "
                                                      "shift, run the sublayer, gate its output, add the input",
                              reference_name="the adaLN-zero half-block of sd.mmdit_blocks")

    problem = _adaln_behaviour(fn, exercise)
    if problem is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                compare()                   # names the mistake on random modulations, if it is a known one
        except AssertionError as named:
            raise AssertionError(f"{named}\n  And at the start: {problem.split(': ', 1)[1].split(chr(10))[0]}") from None
        raise AssertionError(problem)
    return compare()


# ----------------------------------------------------------------------------------------------------------
# Exercise 14.3: joint attention
# ----------------------------------------------------------------------------------------------------------

def _heads(qkv: torch.Tensor, heads: int, per_head_first: bool = False):
    """(B, L, 3D) -> q, k, v, each (B, H, L, d); per_head_first: read the 3D numbers as (H, 3, d) instead."""
    b, length, three_d = qkv.shape
    d = three_d // 3 // heads
    if per_head_first:
        return qkv.reshape(b, length, heads, 3, d).permute(3, 0, 2, 1, 4)
    return qkv.reshape(b, length, 3, heads, d).permute(2, 0, 3, 1, 4)


def _merge(out: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H d); without the transpose, a plain reshape (the wrong order)."""
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d) if transpose else out.reshape(b, length, h * d)


def _attend(q_qkv: torch.Tensor, kv_qkv: torch.Tensor, heads: int, scaled: bool = True, **how) -> torch.Tensor:
    """Queries from q_qkv's tokens, keys and values from kv_qkv's: (B, Lq, D)."""
    q, _, _ = _heads(q_qkv, heads, how.get("per_head_first", False))
    _, k, v = _heads(kv_qkv, heads, how.get("per_head_first", False))
    if not scaled:
        q = q * math.sqrt(q.shape[-1])                                     # undoes the 1/sqrt(d) inside
    return _merge(explicit_attention(q, k, v), how.get("transpose", True))


def _joint_mistake(kind: str, text_kind: str = "self"):
    def compute(ref, case):
        image, text, heads = case.inputs.values()
        n = image.shape[1]
        both = torch.cat([image, text], dim=1)
        if kind == "separate":
            return _attend(image, image, heads), _attend(text, text, heads)
        if kind == "cross":
            text_out = {"self": _attend(text, text, heads), "joint": _attend(both, both, heads)[:, n:],
                        "values": text[..., 2 * text.shape[-1] // 3:]}[text_kind]
            return _attend(image, text, heads), text_out
        if kind == "one_head":
            out = _attend(both, both, 1)
        elif kind == "merge_order":
            out = _attend(both, both, heads, transpose=False)
        elif kind == "per_head_first":
            out = _attend(both, both, heads, per_head_first=True)
        elif kind == "unscaled":
            out = _attend(both, both, heads, scaled=False)
        elif kind == "swapped":
            out = _attend(both, both, heads)
            return out[:, n:], out[:, :n]
        else:
            raise ValueError(kind)
        return out[:, :n], out[:, n:]
    return compute


def check_joint_attention(fn) -> bool:
    """Exercise 14.3: fn(image_qkv (B, N, 3D), text_qkv (B, T, 3D), heads) -> (image out (B, N, D),
    text out (B, T, D)): one softmax attention over all N + T tokens, split back into the two parts."""
    with seeded(143):
        cases = [Case({"image_qkv": randn(2, 6, 3 * 16), "text_qkv": randn(2, 5, 3 * 16), "heads": 4}),
                 Case({"image_qkv": 2 * randn(1, 4, 3 * 12), "text_qkv": 2 * randn(1, 7, 3 * 12), "heads": 3})]
    cross = ("the image attends to the text only (cross-attention, as in the UNet): in MMDiT every token, image "
             "and text, attends to the keys of all N + T tokens")
    mistakes = [
        Mistake("each modality attends only to itself: join the two sequences first, so that every query meets the "
                "keys of both", _joint_mistake("separate")),
        Mistake(cross, _joint_mistake("cross", "self")),
        Mistake(cross, _joint_mistake("cross", "joint")),
        Mistake(cross, _joint_mistake("cross", "values")),
        Mistake("the heads are not split: one attention over the whole width D gives different weights than "
                "heads attending on their own d = D / heads numbers", _joint_mistake("one_head")),
        Mistake("the heads are merged back in the wrong order: (B, heads, L, d) must become (B, L, heads, d) "
                "before the last two axes are merged into D", _joint_mistake("merge_order")),
        Mistake("q, k and v are read per head: each token's 3D numbers are all of q (first D), then all of k, "
                "then all of v, and each of those splits into heads", _joint_mistake("per_head_first")),
        Mistake("the scores are not divided by the square root of the head width d", _joint_mistake("unscaled")),
        Mistake("the two outputs are swapped: the image tokens' output first, then the text tokens'",
                _joint_mistake("swapped")),
    ]
    return check_function("check_joint_attention", fn, joint_attention, cases, mistakes, exercise="14.3",
                          hint="join the two sequences, split q, k, v and the heads, attend once over all tokens, "
                               "merge the heads, split the sequence back",
                          reference_name="joint attention of sd.mmdit_blocks")


# ----------------------------------------------------------------------------------------------------------
# Exercise 14.4: the final layer
# ----------------------------------------------------------------------------------------------------------

def _final_mistake(kind: str):
    def compute(ref, case):
        x, cond = case.inputs.values()
        shift, scale = ref.modulation(cond)
        normed = ref.norm(x)
        if kind == "scale":
            return ref.linear(normed * scale[:, None] + shift[:, None])
        if kind == "swapped":
            return ref.linear(normed * (1 + shift[:, None]) + scale[:, None])
        if kind == "no_norm":
            return ref.linear(modulate(x, shift, scale))
        if kind == "no_modulation":
            return ref.linear(normed)
        raise ValueError(kind)
    return compute


def _require_zero_start(cls, exercise: str) -> None:
    """A freshly built final layer predicts exactly zero, and its gradient reaches the linear layer."""
    with seeded(148):
        init = {"dim": 16, "patch_size": 2, "out_channels": 3}
        layer = build_learner_module(cls, init)
        x, cond = randn(2, 5, 16), randn(2, 16)
    out = layer(x, cond)
    if not isinstance(out, torch.Tensor) or out.shape != (2, 5, 12):
        return                                                              # the numeric check says what is wrong
    if float(out.detach().abs().max()) != 0:
        raise AssertionError(
            "check_final_layer: a freshly built final layer should predict exactly 0 (its linear layer starts "
            f"with zero weights and zero bias), yours gives values up to {float(out.detach().abs().max()):.3g}\n"
            "  Hint: the final layer is not zero-initialised: set the linear layer's weight and bias to zero "
            "when you build it, so the untrained model predicts a velocity of 0")
    out.sum().backward()
    linear = getattr(layer, "linear", None)
    grad = getattr(getattr(linear, "bias", None), "grad", None)
    if grad is None or float(grad.abs().sum()) == 0:
        raise AssertionError("check_final_layer: at the start the gradient must reach the linear layer's bias; "
                             "yours gives it none (is the output computed from it, without detaching?)"
                             + f'\n  More help: hint("{exercise}")')


def check_final_layer(cls) -> bool:
    """Exercise 14.4: cls(dim, patch_size, out_channels); forward(x (B, N, D), cond (B, D)) -> (B, N, p*p*C_out)."""
    exercise = "14.4"
    require_callable("check_final_layer", cls, "a class (the nn.Module itself, not an instance)")
    _require_zero_start(cls, exercise)
    with seeded(144):
        cases = [Case({"x": randn(2, 6, 16), "cond": randn(2, 16)},
                      init={"dim": 16, "patch_size": 2, "out_channels": 4}),
                 Case({"x": 2 * randn(3, 4, 8), "cond": randn(3, 8)},
                      init={"dim": 8, "patch_size": 1, "out_channels": 3})]
    mistakes = [
        Mistake("the normalised tokens are multiplied by scale instead of 1 + scale", _final_mistake("scale")),
        Mistake("shift and scale are exchanged: the modulation gives the shift first, then the scale",
                _final_mistake("swapped")),
        Mistake("the tokens are not normalised before the shift and scale", _final_mistake("no_norm")),
        Mistake("the conditioning is not used: shift and scale the normalised tokens before the linear layer",
                _final_mistake("no_modulation")),
    ]
    return check_module("check_final_layer", cls, FinalLayer, cases, mistakes, exercise=exercise,
                        hint="modulation of the conditioning into shift and scale; LayerNorm; times 1 + scale, plus "
                             "shift; the linear layer to p x p x C numbers per token",
                        reference_name="FinalLayer of sd.mmdit_blocks")
