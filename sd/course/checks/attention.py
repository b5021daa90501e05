"""Checks for notebook 01 (attention): scaled dot-product attention, the causal mask, self- and cross-attention.

Each check compares with `sd.attention` / `sd.cross_attention`; the `Mistake`s below recompute the reference
the typical wrong ways (no 1/sqrt(d) scale, heads split the wrong way, mask after the softmax, ...), so a
wrong answer is named, not just reported.
"""
from __future__ import annotations

import math

import torch

from ...attention import SelfAttention, explicit_attention
from ...cross_attention import CrossAttention
from .common import Case, Mistake, check_function, check_module, randn, seeded

# ----------------------------------------------------------------------------------------------------------
# The reference, computed the wrong ways (used only to name a learner's mistake).
# ----------------------------------------------------------------------------------------------------------


def _attend(q, k, v, scale: str = "sqrt_d", mask: str | None = None, softmax_dim: int = -1):
    """softmax(Q K^T * scale) V with a chosen scale and causal-mask variant (the right one: "sqrt_d", "future")."""
    d, t_q = q.shape[-1], q.shape[-2]
    factor = {"sqrt_d": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d, "times_sqrt_d": math.sqrt(d),
              "sqrt_t": 1 / math.sqrt(t_q)}[scale]
    scores = (q @ k.transpose(-2, -1)) * factor   # (B, H, Tq, Tk)
    ones = torch.ones(scores.shape[-2:], dtype=torch.bool)
    hide = {"future": ones.triu(1),        # right: token i sees 0..i
            "diagonal": ones.triu(0),      # off by one: token i cannot see itself
            "next": ones.triu(2),          # off by one: token i also sees i+1
            "past": ones.tril(-1)}.get(mask)   # inverted: token i sees i.. the end
    if hide is not None:
        scores = scores.masked_fill(hide, float("-inf"))
    if mask == "zero":
        scores = scores.masked_fill(ones.triu(1), 0.0)
    weights = scores.softmax(dim=softmax_dim)
    if mask == "after_softmax":
        weights = weights.masked_fill(ones.triu(1), 0.0)
    return weights @ v


def _split(x, n_heads: int, how: str = "right"):
    """(B, T, C) -> (B, H, T, C/H); "view_bhtd" is the common wrong way: a view straight to (B, H, T, C/H)."""
    b, t, c = x.shape
    if how == "right":
        return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)
    if how == "view_bhtd":
        return x.view(b, n_heads, t, c // n_heads)
    if how == "one_head":
        return x[:, None]
    raise ValueError(how)


def _merge(x, how: str = "right"):
    """(B, H, T, C/H) -> (B, T, C); "reshape" skips the transpose back (mixing heads and positions)."""
    b, h, t, d = x.shape
    if how == "right":
        return x.transpose(1, 2).reshape(b, t, h * d)
    if how == "reshape":
        return x.reshape(b, t, h * d)
    raise ValueError(how)


def _multi_head(ref, x, context, causal: bool = False, split: str = "right", merge: str = "right",
                scale: str = "sqrt_d", out_proj: bool = True, residual: bool = False,
                queries_from: str = "x", keys_from: str = "context", softmax_dim: int = -1,
                head_scale_width: bool = False):
    """The reference module's forward, with one thing done the wrong way (its weights, its head count)."""
    sources = {"x": x, "context": context}
    q = _split(ref.to_q(sources[queries_from]), ref.n_heads, split)
    k = _split(ref.to_k(sources[keys_from]), ref.n_heads, split)
    v = _split(ref.to_v(sources[keys_from]), ref.n_heads, split)
    if head_scale_width:   # scaled by 1/sqrt(C), the full width, instead of 1/sqrt(C/H), one head's
        q = q / math.sqrt(ref.n_heads)
    out = _merge(_attend(q, k, v, scale=scale, mask="future" if causal else None, softmax_dim=softmax_dim), merge)
    if out_proj:
        out = ref.to_out(out)
    return x + out if residual else out


# ----------------------------------------------------------------------------------------------------------
# Exercise 1.1: scaled dot-product attention
# ----------------------------------------------------------------------------------------------------------

def _qkv_cases() -> list[Case]:
    # Tq != Tk != d, so a transposed product or a wrong index shows up as a shape or value difference
    with seeded():
        return [Case({"q": randn(2, 3, 5, 8), "k": randn(2, 3, 7, 8), "v": randn(2, 3, 7, 8)}),
                Case({"q": randn(1, 2, 6, 16), "k": randn(1, 2, 6, 16), "v": randn(1, 2, 6, 16)}),
                Case({"q": 3 * randn(2, 1, 4, 32), "k": 3 * randn(2, 1, 9, 32), "v": randn(2, 1, 9, 32)})]


_SCALE_MISTAKES = [
    Mistake("the scores are not scaled: multiply Q Kᵀ by 1/√d, with d the size of one query (the last "
            "dimension), before the softmax",
            lambda ref, c: _attend(*c.inputs.values(), scale="none")),
    Mistake("the scores are divided by d: the scale is 1/√d, not 1/d",
            lambda ref, c: _attend(*c.inputs.values(), scale="d")),
    Mistake("the scores are multiplied by √d: divide by √d instead",
            lambda ref, c: _attend(*c.inputs.values(), scale="times_sqrt_d")),
    Mistake("the scale uses the sequence length (the number of queries): d is the size of one query, the last "
            "dimension",
            lambda ref, c: _attend(*c.inputs.values(), scale="sqrt_t")),
    Mistake("the softmax runs over the queries (the second-to-last dimension): each query's weights over the "
            "keys must sum to 1, so normalise over the last dimension",
            lambda ref, c: _attend(*c.inputs.values(), softmax_dim=-2)),
    Mistake("the softmax runs over dimension 1, the heads (what PyTorch's softmax picks for a 4-D tensor when "
            "no dimension is given): name the last dimension, the keys",
            lambda ref, c: _attend(*c.inputs.values(), softmax_dim=1)),
]


def check_scaled_dot_product_attention(fn) -> bool:
    """Exercise 1.1: fn(q, k, v) = softmax(Q K^T / sqrt(d)) V for q (B, H, Tq, d), k and v (B, H, Tk, d)."""
    mistakes = _SCALE_MISTAKES + [
        Mistake("you returned the attention weights (B, H, Tq, Tk): the output averages the values with them, "
                "(B, H, Tq, d)",
                lambda ref, c: (c.inputs["q"] @ c.inputs["k"].transpose(-2, -1)
                                / math.sqrt(c.inputs["q"].shape[-1])).softmax(-1)),
    ]
    return check_function("check_scaled_dot_product_attention", fn, explicit_attention, _qkv_cases(), mistakes,
                          exercise="1.1",
                          hint="the scores are every query's dot product with every key, times 1/√d; the softmax "
                               "over the keys turns them into weights; the output is the weighted mean of the values")


# ----------------------------------------------------------------------------------------------------------
# Exercise 1.2: causal attention
# ----------------------------------------------------------------------------------------------------------

def _causal_reference(q, k, v):
    return explicit_attention(q, k, v, causal=True)


def check_causal_attention(fn) -> bool:
    """Exercise 1.2: fn(q, k, v) = attention where token i sees only tokens 0..i (q, k, v of shape (B, H, T, d))."""
    with seeded(1):
        cases = [Case({"q": randn(2, 3, 6, 8), "k": randn(2, 3, 6, 8), "v": randn(2, 3, 6, 8)}),
                 Case({"q": 2 * randn(1, 2, 9, 16), "k": 2 * randn(1, 2, 9, 16), "v": randn(1, 2, 9, 16)})]

    def wrong(**how):
        return lambda ref, c: _attend(*c.inputs.values(), **how)

    mistakes = [
        Mistake("no causal mask: token i must not see tokens i+1, i+2, ... (give the strict upper triangle "
                "of the scores, key j > query i, a score of -∞)", wrong(mask=None)),
        Mistake("the mask is applied after the softmax: set the future scores to -∞ BEFORE the softmax, "
                "so each row of weights still sums to 1", wrong(mask="after_softmax")),
        Mistake("the mask is off by one and hides the diagonal too, so token 0 sees nothing: a row where every "
                "score is -inf gives NaN after the softmax; token i may see itself (hide only j > i, the triangle "
                "strictly above the diagonal)", wrong(mask="diagonal")),
        Mistake("the mask is off by one and lets token i see token i+1: hide every key j > i, the triangle "
                "starting just above the diagonal", wrong(mask="next")),
        Mistake("the mask is inverted: it hides the past; token i must see 0..i and not i+1 ... T-1",
                wrong(mask="past")),
        Mistake("the future scores are set to 0, not -inf: exp(0) = 1 still gives them weight",
                wrong(mask="zero")),
        Mistake("the masked scores are not scaled: multiply Q Kᵀ by 1/√d before masking and the softmax",
                wrong(mask="future", scale="none")),
    ]
    return check_function("check_causal_attention", fn, _causal_reference, cases, mistakes, exercise="1.2",
                          reference_name="causal attention (sd.attention.explicit_attention, causal)",
                          hint="scaled scores as in exercise 1.1; every key j after its query i (j > i) gets the "
                               "score -∞ before the softmax, so its weight is exactly 0")


# ----------------------------------------------------------------------------------------------------------
# Exercise 1.3: multi-head self-attention
# ----------------------------------------------------------------------------------------------------------

def _head_mistakes(context_key: str | None) -> list[Mistake]:
    """Mistakes shared by self- and cross-attention; context_key names the input keys/values come from."""
    def wrong(**how):
        def compute(ref, c):
            x = c.inputs["x"]
            context = c.inputs[context_key] if context_key else x
            return _multi_head(ref, x, context, causal=c.kwargs.get("causal", False), **how)
        return compute

    return [
        Mistake("the scores are not scaled: multiply Q Kᵀ by 1/√d with d the head size C/H", wrong(scale="none")),
        Mistake("the scale uses the full width C: it is 1/√(C/H), with C/H the size of one head",
                wrong(head_scale_width=True)),
        Mistake("the heads are split the wrong way: cut the features of each token, (B, T, C) -> (B, T, H, C/H), "
                "then swap the token and head axes to (B, H, T, C/H); reading (B, T, C) directly as (B, H, T, C/H) "
                "mixes positions into the heads", wrong(split="view_bhtd", merge="reshape")),
        Mistake("the heads are split the wrong way: cut the features of each token, (B, T, C) -> (B, T, H, C/H), "
                "then swap the token and head axes to (B, H, T, C/H); reading (B, T, C) directly as (B, H, T, C/H) "
                "mixes positions into the heads", wrong(split="view_bhtd")),
        Mistake("the heads are merged the wrong way: swap the axes back, (B, H, T, C/H) -> (B, T, H, C/H), "
                "before joining the heads into (B, T, C)", wrong(merge="reshape")),
        Mistake("the output projection is missing: the merged heads go through to_out", wrong(out_proj=False)),
        Mistake("the input is added to the output: this module returns only the attention; the residual "
                "connection belongs to the block around it", wrong(residual=True)),
        Mistake("the input is not split into heads: one head over the whole width is a different function; "
                "split (B, T, C) into n_heads heads of C/H features", wrong(split="one_head")),
        Mistake("the softmax runs over the queries (the second-to-last dimension): normalise over the keys, "
                "the last dimension", wrong(softmax_dim=-2)),
    ]


def check_self_attention(cls) -> bool:
    """Exercise 1.3: cls(dim, n_heads, qkv_bias) with to_q, to_k, to_v, to_out; forward(x, causal=False) on (B, T, C)."""
    with seeded(2):
        cases = [Case({"x": randn(2, 6, 16)}, init={"dim": 16, "n_heads": 4, "qkv_bias": True}),
                 Case({"x": randn(1, 9, 24)}, init={"dim": 24, "n_heads": 2, "qkv_bias": False}),
                 Case({"x": randn(2, 7, 16)}, kwargs={"causal": True}, init={"dim": 16, "n_heads": 4, "qkv_bias": True}),
                 Case({"x": randn(1, 5, 8)}, init={"dim": 8, "n_heads": 1, "qkv_bias": True})]

    def ignores_causal(ref, c):
        return _multi_head(ref, c.inputs["x"], c.inputs["x"], causal=False) if c.kwargs.get("causal") else None

    mistakes = _head_mistakes(None) + [
        Mistake("forward ignores its causal flag: when it is true, pass it on to the attention (token i may only "
                "see 0..i)",
                ignores_causal)]
    return check_module("check_self_attention", cls, SelfAttention, cases, mistakes, exercise="1.3",
                        hint="queries, keys and values from x through their projections; each split into heads "
                             "(B, T, C) -> (B, H, T, C/H); attention per head; heads merged back to (B, T, C); "
                             "the output projection")


# ----------------------------------------------------------------------------------------------------------
# Exercise 1.4: cross-attention
# ----------------------------------------------------------------------------------------------------------

def check_cross_attention(cls) -> bool:
    """Exercise 1.4: cls(dim, context_dim, n_heads); forward(x (B, T, C), context (B, S, D)) -> (B, T, C)."""
    with seeded(3):
        # the first case has D == C, so keys taken from x instead of the context give an output to name
        cases = [Case({"x": randn(2, 6, 16), "context": randn(2, 5, 16)},
                      init={"dim": 16, "context_dim": 16, "n_heads": 4}),
                 Case({"x": randn(2, 8, 16), "context": randn(2, 3, 12)},
                      init={"dim": 16, "context_dim": 12, "n_heads": 2}),
                 Case({"x": randn(1, 4, 24), "context": randn(1, 7, 32)},
                      init={"dim": 24, "context_dim": 32, "n_heads": 3})]

    def wrong(**how):
        return lambda ref, c: _multi_head(ref, c.inputs["x"], c.inputs["context"], **how)

    mistakes = [
        Mistake("the keys and values come from x: in cross-attention they come from the context "
                "(projected by to_k and to_v); only the queries come from x", wrong(keys_from="x")),
        Mistake("the queries come from the context: queries come from x (one output per image token), "
                "keys and values from the context", wrong(queries_from="context")),
        Mistake("the queries come from the context and the keys from x: swap them; queries from x, keys and "
                "values from the context", wrong(queries_from="context", keys_from="x")),
    ] + _head_mistakes("context")
    return check_module("check_cross_attention", cls, CrossAttention, cases, mistakes, exercise="1.4",
                        hint="queries from x (B, T, C); keys and values from the context, projected to (B, S, C); "
                             "split into heads, attend, merge, then the output projection")
