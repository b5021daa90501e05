"""The exercise checks of notebooks 00 and 01: the reference passes, plausible wrong implementations are named.

The wrong implementations below are written the way a learner would write them (not taken from the checks),
so each test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd
from sd.attention import explicit_attention
from sd.course.checks import (check_causal_attention, check_cross_attention, check_scaled_dot_product_attention,
                       check_self_attention, check_softmax, pick, try_check)
from sd.course.checks.common import copy_weights, randomise_constant_parameters
from tests.check_helpers import rejects, rejects_unrecognised


# ---------------------------------------------------------------------------------------------------------
# Wrong implementations, as a learner might write them
# ---------------------------------------------------------------------------------------------------------

def attention_without_scale(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def attention_scaled_by_d(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(-1) @ v


def attention_scaled_by_length(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.size(2))).softmax(-1) @ v


def attention_softmax_over_queries(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=2) @ v


def attention_softmax_without_dim(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=1) @ v   # what dim=None picks for 4-D


def attention_weights_only(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)


def causal_mask_after_softmax(q, k, v):
    t = q.shape[-2]
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    return (w * torch.tril(torch.ones(t, t))) @ v


def causal_mask_hides_diagonal(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
    return s.softmax(-1) @ v


def causal_mask_sees_next_token(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t).triu(diagonal=2) == 1, float("-inf"))
    return s.softmax(-1) @ v


def causal_mask_inverted(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t).tril(-1).bool(), float("-inf"))
    return s.softmax(-1) @ v


def causal_mask_fills_zero(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s * torch.ones(t, t).tril()   # "zero out the future"
    return s.softmax(-1) @ v


class SelfAttentionBase(nn.Module):
    """The exercise's constructor; the subclasses below get forward wrong in one way each."""

    def __init__(self, dim, n_heads, qkv_bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def heads(self, x):
        b, t, c = x.shape
        return x.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)

    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        out = explicit_attention(q, k, v, causal=causal)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class SelfAttentionHeadsSplitWrong(SelfAttentionBase):
    def heads(self, x):
        b, t, c = x.shape
        return x.view(b, self.n_heads, t, c // self.n_heads)

    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        return self.to_out(explicit_attention(q, k, v, causal=causal).reshape(x.shape))


class SelfAttentionNoScale(SelfAttentionBase):
    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        # scaling q by sqrt(d) cancels the reference's 1/sqrt(d): the scores end up unscaled
        out = explicit_attention(q * math.sqrt(q.shape[-1]), k, v, causal=causal)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class SelfAttentionScaledByWidth(SelfAttentionBase):
    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1])
        out = scores.softmax(-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class SelfAttentionNoOutputProjection(SelfAttentionBase):
    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        return explicit_attention(q, k, v, causal=causal).transpose(1, 2).reshape(x.shape)


class SelfAttentionMergedWrong(SelfAttentionBase):
    def forward(self, x, causal=False):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        return self.to_out(explicit_attention(q, k, v, causal=causal).reshape(x.shape))


class SelfAttentionWithResidual(SelfAttentionBase):
    def forward(self, x, causal=False):
        return x + super().forward(x, causal)


class SelfAttentionIgnoresCausal(SelfAttentionBase):
    def forward(self, x, causal=False):
        return super().forward(x)


class SelfAttentionRenamed(SelfAttentionBase):
    def __init__(self, dim, n_heads, qkv_bias=True):
        super().__init__(dim, n_heads, qkv_bias)
        self.proj = self.to_out
        del self.to_out


class SelfAttentionFusedQKV(nn.Module):
    def __init__(self, dim, n_heads, qkv_bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)


class CrossAttentionBase(nn.Module):
    def __init__(self, dim, context_dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def heads(self, x):
        b, t, c = x.shape
        return x.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)

    def attend(self, q_in, kv_in, out_proj=True):
        q = self.heads(self.to_q(q_in))
        k, v = self.heads(self.to_k(kv_in)), self.heads(self.to_v(kv_in))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.to_out(out) if out_proj else out

    def forward(self, x, context):
        return self.attend(x, context)


class CrossAttentionKeysFromX(CrossAttentionBase):
    def forward(self, x, context):
        return self.attend(x, x)


class CrossAttentionNoOutputProjection(CrossAttentionBase):
    def forward(self, x, context):
        return self.attend(x, context, out_proj=False)


class CrossAttentionQueriesFromContext(CrossAttentionBase):
    def forward(self, x, context):
        return self.attend(context, context)


class CrossAttentionNoScale(CrossAttentionBase):
    def forward(self, x, context):
        q = self.heads(self.to_q(x))
        k, v = self.heads(self.to_k(context)), self.heads(self.to_v(context))
        out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).flatten(2)
        return self.to_out(out)


# ---------------------------------------------------------------------------------------------------------
# The reference passes, with one pass line
# ---------------------------------------------------------------------------------------------------------

def test_checks_pass_the_reference_implementations_with_one_line(capsys):
    assert check_softmax(lambda x: torch.softmax(x, dim=-1)) is True
    assert check_scaled_dot_product_attention(explicit_attention) is True
    assert check_scaled_dot_product_attention(F.scaled_dot_product_attention) is True
    assert check_causal_attention(functools.partial(explicit_attention, causal=True)) is True
    assert check_causal_attention(functools.partial(F.scaled_dot_product_attention, is_causal=True)) is True
    assert check_self_attention(sd.SelfAttention) is True
    assert check_cross_attention(sd.CrossAttention) is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)
    assert "check_self_attention passed: matches sd.attention.SelfAttention on 4 random inputs" in lines[5]


def test_checks_pass_a_correct_learner_implementation_written_differently():
    def my_softmax(x):
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    assert check_softmax(my_softmax)
    assert check_self_attention(SelfAttentionBase)
    assert check_cross_attention(CrossAttentionBase)


# ---------------------------------------------------------------------------------------------------------
# Wrong implementations are rejected, and the message names the mistake
# ---------------------------------------------------------------------------------------------------------

def test_check_softmax_names_overflow_and_wrong_dimension():
    message = rejects(check_softmax, lambda x: x.exp() / x.exp().sum(-1, keepdim=True), "NaN", "exp overflows",
                      "moves by the same amount")
    assert "maximum" not in message   # the stable trick is the exercise: the message asks, it does not tell
    rejects(check_softmax, lambda x: torch.softmax(x, dim=0), "first dimension")
    rejects(check_softmax, lambda x: (x - x.max()).exp() / (x - x.max()).exp().sum(), "whole tensor")


def softmax_shifted_by_global_max(x):
    e = torch.exp(x - x.max())
    return e / e.sum(dim=-1, keepdim=True)


def softmax_shifted_by_mean(x):
    e = torch.exp(x - x.mean(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def test_check_softmax_names_a_shift_that_is_not_each_rows_maximum():
    rejects(check_softmax, softmax_shifted_by_global_max, "whole tensor, not of each row", "underflows")
    rejects(check_softmax, softmax_shifted_by_mean, "shifted by its mean", "exp(296) = inf")


def test_check_softmax_sees_underflow_of_very_negative_scores():
    def literal(x):
        return x.exp() / x.exp().sum(-1, keepdim=True)

    assert torch.isnan(literal(torch.full((1, 3), -1000.0))).all()   # 0 / 0: why the check has such a row
    rejects(check_softmax, literal, "underflows")


def test_check_softmax_does_not_recognise_a_softmax_at_another_temperature():
    message = rejects_unrecognised(check_softmax, lambda x: torch.softmax(x / 2, dim=-1), "0.1")
    assert "max difference" in message


def test_attention_checks_point_to_the_hints_on_an_unknown_mistake():
    def doubled_output(q, k, v):
        return 2 * explicit_attention(q, k, v)

    def weak_causal_penalty(q, k, v):
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s - torch.ones(t, t).triu(1)        # the future penalised by 1, not hidden
        return s.softmax(-1) @ v

    class KeysFromValueProjection(SelfAttentionBase):
        def forward(self, x, causal=False):
            q, k, v = self.heads(self.to_q(x)), self.heads(self.to_v(x)), self.heads(self.to_v(x))
            return self.to_out(explicit_attention(q, k, v, causal=causal).transpose(1, 2).reshape(x.shape))

    class KeysAndValuesSwapped(CrossAttentionBase):
        def forward(self, x, context):
            q = self.heads(self.to_q(x))
            k, v = self.heads(self.to_v(context)), self.heads(self.to_k(context))
            return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    rejects_unrecognised(check_scaled_dot_product_attention, doubled_output, "1.1")
    rejects_unrecognised(check_causal_attention, weak_causal_penalty, "1.2")
    rejects_unrecognised(check_self_attention, KeysFromValueProjection, "1.3")
    rejects_unrecognised(check_cross_attention, KeysAndValuesSwapped, "1.4")


@pytest.mark.parametrize("check, impl", [
    (check_softmax, lambda x: x.exp() / x.exp().sum(-1, keepdim=True)),
    (check_scaled_dot_product_attention, attention_without_scale),
    (check_causal_attention, causal_mask_hides_diagonal),
    (check_self_attention, SelfAttentionHeadsSplitWrong),
    (check_cross_attention, CrossAttentionKeysFromX),
])
def test_named_mistakes_in_00_and_01_are_said_in_words_not_code(check, impl):
    from tests.check_helpers import program_text
    message = rejects(check, impl, "Hint: ")
    assert program_text(message) is None, message


@pytest.mark.parametrize("impl, mistake", [
    (attention_without_scale, "not scaled"),
    (attention_scaled_by_d, "divided by d"),
    (attention_scaled_by_length, "sequence length"),
    (attention_softmax_over_queries, "over the queries"),
    (attention_softmax_without_dim, "dimension 1, the heads"),
])
def test_check_scaled_dot_product_attention_names_the_mistake(impl, mistake):
    message = rejects(check_scaled_dot_product_attention, impl, "check_scaled_dot_product_attention failed",
                      "max difference", "Hint: ", mistake)
    assert "q (2, 3, 5, 8)" in message   # says which input


def test_check_scaled_dot_product_attention_reports_a_wrong_shape():
    rejects(check_scaled_dot_product_attention, attention_weights_only,
            "shape (2, 3, 5, 7), expected (2, 3, 5, 8)", "attention weights")


def test_check_scaled_dot_product_attention_reports_a_crash_with_the_input_shapes():
    def transposes_the_wrong_factor(q, k, v):
        return (q.transpose(-2, -1) @ k).softmax(-1) @ v

    rejects(check_scaled_dot_product_attention, transposes_the_wrong_factor, "raised RuntimeError",
            "q (2, 3, 5, 8), k (2, 3, 7, 8)")


@pytest.mark.parametrize("impl, mistake", [
    (explicit_attention, "no causal mask"),
    (causal_mask_after_softmax, "after the softmax"),
    (causal_mask_hides_diagonal, "hides the diagonal"),
    (causal_mask_sees_next_token, "see token i+1"),
    (causal_mask_inverted, "inverted"),
    (causal_mask_fills_zero, "set to 0, not -inf"),
])
def test_check_causal_attention_names_the_mistake(impl, mistake):
    rejects(check_causal_attention, impl, "check_causal_attention failed", mistake)


def test_check_causal_attention_says_where_nan_comes_from():
    rejects(check_causal_attention, causal_mask_hides_diagonal, "NaN", "every score is -inf")


@pytest.mark.parametrize("cls, mistake", [
    (SelfAttentionHeadsSplitWrong, "heads are split the wrong way"),
    (SelfAttentionNoScale, "not scaled"),
    (SelfAttentionScaledByWidth, "full width C"),
    (SelfAttentionNoOutputProjection, "output projection is missing"),
    (SelfAttentionMergedWrong, "merged the wrong way"),
    (SelfAttentionWithResidual, "residual"),
    (SelfAttentionIgnoresCausal, "ignores its causal flag"),
])
def test_check_self_attention_names_the_mistake(cls, mistake):
    rejects(check_self_attention, cls, "check_self_attention failed", mistake)


def test_check_self_attention_lists_the_expected_parameter_names():
    message = rejects(check_self_attention, SelfAttentionRenamed, "missing in yours: to_out.weight, to_out.bias",
                      "unexpected in yours: proj.weight (16, 16)")
    assert "expected: to_q.weight (16, 16), to_q.bias (16,)" in message
    rejects(check_self_attention, SelfAttentionFusedQKV, "missing in yours: to_q.weight", "qkv.weight (48, 16)")


def test_check_self_attention_wants_the_class_not_an_instance():
    rejects(check_self_attention, sd.SelfAttention(16, 4), "pass the class")


def test_check_self_attention_explains_a_constructor_with_another_signature():
    class TakesOnlyDim(SelfAttentionBase):
        def __init__(self, dim):
            super().__init__(dim, 4)

    rejects(check_self_attention, TakesOnlyDim, "TakesOnlyDim(dim=16, n_heads=4, qkv_bias=True)", "TypeError")


@pytest.mark.parametrize("cls, mistake", [
    (CrossAttentionKeysFromX, "keys and values come from x"),
    (CrossAttentionNoOutputProjection, "output projection is missing"),
    (CrossAttentionQueriesFromContext, "queries come from the context"),
    (CrossAttentionNoScale, "not scaled"),
])
def test_check_cross_attention_names_the_mistake(cls, mistake):
    rejects(check_cross_attention, cls, "check_cross_attention failed", mistake)


def test_copy_weights_loads_the_reference_weights_into_the_learners_module():
    reference, learner = sd.SelfAttention(8, 2), SelfAttentionBase(8, 2)
    copy_weights(learner, reference)
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(learner(x), reference(x))


# ---------------------------------------------------------------------------------------------------------
# pick / try_check: the notebook goes on with the learner's code if it passes, else with the reference
# ---------------------------------------------------------------------------------------------------------

def test_pick_keeps_a_passing_implementation(capsys):
    assert pick(check_self_attention, SelfAttentionBase, reference=sd.SelfAttention) is SelfAttentionBase
    assert capsys.readouterr().out.startswith("✅ check_self_attention passed")


def test_pick_falls_back_to_the_reference_when_the_exercise_is_not_done(capsys):
    def stub(q, k, v):
        raise NotImplementedError("Exercise 1.1: scale the scores by 1/sqrt(d) before the softmax")

    assert pick(check_scaled_dot_product_attention, stub, reference=explicit_attention) is explicit_attention
    out = capsys.readouterr().out
    assert "not done yet: Exercise 1.1: scale the scores" in out
    assert 'before the softmax (more help: hint("1.1"))' in out
    assert "using the reference sd.attention.explicit_attention for the rest of this notebook" in out


def test_pick_falls_back_to_the_reference_when_the_check_fails_and_shows_why(capsys):
    chosen = pick(check_cross_attention, CrossAttentionKeysFromX, reference=sd.CrossAttention)
    assert chosen is sd.CrossAttention
    out = capsys.readouterr().out
    assert "❌ check_cross_attention failed" in out and "keys and values come from x" in out
    assert "using the reference sd.cross_attention.CrossAttention" in out


def test_pick_falls_back_when_the_learners_constructor_crashes(capsys):
    class Broken(SelfAttentionBase):
        def __init__(self, dim, n_heads, qkv_bias=True):
            raise KeyError("oops")

    assert pick(check_self_attention, Broken, reference=sd.SelfAttention) is sd.SelfAttention
    assert "KeyError" in capsys.readouterr().out


def test_pick_names_a_partial_reference(capsys):
    reference = functools.partial(explicit_attention, causal=True)
    assert pick(check_causal_attention, explicit_attention, reference=reference) is reference
    assert "sd.attention.explicit_attention(causal=True)" in capsys.readouterr().out


def test_try_check_returns_false_instead_of_raising(capsys):
    assert try_check(check_softmax, lambda x: torch.softmax(x, 0)) is False
    assert try_check(check_softmax, lambda x: torch.softmax(x, -1)) is True
    assert "❌ check_softmax failed" in capsys.readouterr().out


def test_checks_leave_the_learners_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_self_attention(sd.SelfAttention)
    torch.testing.assert_close(torch.rand(3), expected)


def test_checks_randomise_the_norms_a_fresh_module_sets_to_one_and_zero():
    layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    linear_weight = layer[0].weight.clone()
    changed = randomise_constant_parameters(layer)
    assert changed == ["1.weight", "1.bias", "2.weight", "2.bias"]
    for norm in (layer[1], layer[2]):
        assert not torch.equal(norm.weight, torch.ones(4)) and not torch.equal(norm.bias, torch.zeros(4))
        assert len(set(norm.weight.tolist())) == 4
    assert torch.equal(layer[0].weight, linear_weight)   # random already: left alone

