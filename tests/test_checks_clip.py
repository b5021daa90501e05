"""The exercise checks of notebook 03 (CLIP): the reference passes, plausible wrong implementations are named.

The wrong implementations below are written the way a learner would write them (not taken from the checks),
so each test shows that a real mistake produces a message pointing at it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd
from sd.attention import SelfAttention
from sd.bpe import bpe, get_pairs, merge_pair
from sd.course.checks import (check_bpe, check_clip_embedding, check_clip_layer, check_merge_pair,
                              check_sigmoid_fit_error, pick)
from sd.course.checks.clip import sigmoid_fit_error
from sd.clip import CLIPEmbedding, CLIPLayer, quick_gelu
from tests.check_helpers import program_text, rejects, rejects_unrecognised


def rejects_in_words(check, impl, *fragments: str) -> str:
    """rejects(), and the message names the mistake in words: no program text."""
    message = rejects(check, impl, *fragments)
    found = program_text(message)
    assert found is None, f"the check's message shows program text ({found}):\n{message}"
    return message


def test_clip_checks_pass_the_reference_with_one_line_each(capsys):
    assert check_merge_pair(merge_pair) is True
    assert check_bpe(bpe) is True
    assert check_clip_embedding(CLIPEmbedding) is True
    assert check_sigmoid_fit_error(sigmoid_fit_error) is True
    assert check_clip_layer(CLIPLayer) is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)
    assert lines[0] == "✅ check_merge_pair passed: matches sd.bpe.merge_pair on 6 examples"


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.1: merge_pair, as a learner might write it
# ---------------------------------------------------------------------------------------------------------

def merge_with_index_loop(word, pair):
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def merge_first_only(word, pair):
    word = list(word)
    for i in range(len(word) - 1):
        if word[i] == pair[0] and word[i + 1] == pair[1]:
            word[i:i + 2] = [pair[0] + pair[1]]
            break
    return tuple(word)


def merge_with_text_replace(word, pair):
    return tuple(" ".join(word).replace(" ".join(pair), "".join(pair)).split())


def merge_without_skipping(word, pair):
    out = []
    for i in range(len(word)):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
        elif i == 0 or (word[i - 1], word[i]) != pair:
            out.append(word[i])
    return tuple(out)


def merge_dropping_the_end(word, pair):
    out, i = [], 0
    while i < len(word) - 1:
        if (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def test_check_merge_pair_passes_a_correct_merge_written_differently():
    assert check_merge_pair(merge_with_index_loop)


@pytest.mark.parametrize("fn, mistake", [
    (merge_first_only, "only the first occurrence"),
    (merge_with_text_replace, "text replacement also matches inside symbols"),
    (merge_dropping_the_end, "last symbol is lost"),
])
def test_check_merge_pair_names_the_mistake(fn, mistake):
    rejects_in_words(check_merge_pair, fn, "check_merge_pair failed", "expected", mistake)


def test_check_merge_pair_points_to_the_hints_for_a_mistake_it_does_not_know():
    def merge_reversed(word, pair):   # merges right to left, then reverses the word: a mistake no check lists
        return tuple(reversed(merge_with_index_loop(word, pair)))

    rejects_unrecognised(check_merge_pair, merge_reversed, "3.1")


def test_check_merge_pair_shows_the_word_it_got_and_the_one_expected():
    message = rejects(check_merge_pair, merge_first_only, "example 2 of 6")
    assert "got ('ab', 'a', 'b', 'c</w>'), expected ('ab', 'ab', 'c</w>')" in message


def test_check_merge_pair_names_a_symbol_used_twice():
    def merge_overlapping(word, pair):   # moves on by one after a merge
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(word[i] + word[i + 1])
            else:
                out.append(word[i])
            i += 1
        return tuple(out)

    rejects_in_words(check_merge_pair, merge_overlapping, "used in two merges", "after BOTH joined symbols")
    # a version that cleans up neighbours still joins ('a', 'a', 'a</w>') into two overlapping pairs
    with pytest.raises(AssertionError):
        check_merge_pair(merge_without_skipping)


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.2: bpe
# ---------------------------------------------------------------------------------------------------------

def encode_by_rank(word, ranks):
    while len(word) > 1:
        candidates = [(ranks[p], p) for p in get_pairs(word) if p in ranks]
        if not candidates:
            return word
        word = merge_pair(word, min(candidates)[1])
    return word


def encode_left_to_right(word, ranks):
    merged = True
    while merged:
        merged = False
        for pair in zip(word[:-1], word[1:]):
            if pair in ranks:
                word = merge_pair(word, pair)
                merged = True
                break
    return word


def encode_highest_rank(word, ranks):
    while len(word) > 1:
        pair = max(get_pairs(word), key=lambda p: ranks.get(p, -1))
        if pair not in ranks:
            break
        word = merge_pair(word, pair)
    return word


def encode_without_key(word, ranks):
    while len(word) > 1:
        pair = min(get_pairs(word))
        if pair not in ranks:
            break
        word = merge_pair(word, pair)
    return word


def encode_once(word, ranks):
    pairs = [p for p in get_pairs(word) if p in ranks]
    return merge_pair(word, min(pairs, key=ranks.get)) if pairs else word


def encode_without_stopping(word, ranks):
    while len(word) > 1:
        pair = min(get_pairs(word), key=lambda p: ranks.get(p, math.inf))
        word = merge_pair(word, pair)   # no `break` when the pair is unknown: it is merged anyway
    return word


def encode_waiting_for_one_symbol(word, ranks):
    while len(word) > 1:   # spins for ever once no learned merge is left and the word is still 2+ symbols
        known = [p for p in get_pairs(word) if p in ranks]
        if known:
            word = merge_pair(word, min(known, key=ranks.get))
    return word


def test_check_bpe_passes_a_correct_encoder_written_differently():
    assert check_bpe(encode_by_rank)


@pytest.mark.parametrize("fn, mistake", [
    (encode_left_to_right, "merged from left to right"),
    (encode_highest_rank, "highest rank"),
    (encode_without_key, "compared as strings"),
    (encode_once, "only one merge"),
    (encode_without_stopping, "not among the ranks are merged too"),
])
def test_check_bpe_names_the_mistake(fn, mistake):
    rejects_in_words(check_bpe, fn, "check_bpe failed on example 1 of 7", "ranks {'b' 'a': 0", mistake)


def test_check_bpe_points_to_the_hints_for_a_mistake_it_does_not_know():
    def encode_and_drop_the_word_end(word, ranks):   # a correct encoding whose last symbol loses its end mark
        word = encode_by_rank(word, ranks)
        return (*word[:-1], word[-1].replace("</w>", ""))

    rejects_unrecognised(check_bpe, encode_and_drop_the_word_end, "3.2")


def test_check_bpe_stops_an_endless_loop_with_a_message():
    rejects_in_words(check_bpe, encode_waiting_for_one_symbol, "the loop does not stop", "not a learned merge")


def test_check_bpe_reports_a_crash_on_a_single_symbol_word():
    def encode_forgetting_single_symbols(word, ranks):
        while True:
            pair = min(get_pairs(word), key=lambda p: ranks.get(p, math.inf))   # min() of no pairs raises
            if pair not in ranks:
                return word
            word = merge_pair(word, pair)

    # "newest" merges into the single symbol 'newest</w>', where min() of no pairs raises
    rejects(check_bpe, encode_forgetting_single_symbols, "raised ValueError", "('n', 'e', 'w', 'e', 's', 't</w>')")


def encode_stopping_at_two_symbols(word, ranks):
    while len(word) > 2:   # one symbol too early: a learned word never becomes one symbol
        pair = min(get_pairs(word), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        word = merge_pair(word, pair)
    return word


def test_check_bpe_names_a_loop_that_stops_with_two_symbols_left():
    rejects(check_bpe, encode_stopping_at_two_symbols, "('newest</w>',)", "stops with two symbols left")


def test_check_bpe_and_merge_pair_want_a_tuple_not_a_list():
    rejects(check_bpe, lambda word, ranks: list(encode_by_rank(word, ranks)), "should be a tuple of symbols",
            "got list")
    rejects(check_merge_pair, lambda word, pair: list(merge_with_index_loop(word, pair)),
            "should be a tuple of symbols", "got list")


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.3: embeddings
# ---------------------------------------------------------------------------------------------------------

class Embedding(nn.Module):
    def __init__(self, vocab_size, width, max_tokens):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_tokens, width)

    def forward(self, tokens):
        t = tokens.shape[1]
        return self.token_embedding(tokens) + self.position_embedding.weight[:t]


class EmbeddingWithoutPositions(Embedding):
    def forward(self, tokens):
        return self.token_embedding(tokens)


class EmbeddingPositionsFromIds(Embedding):
    def forward(self, tokens):
        return self.token_embedding(tokens) + self.position_embedding(tokens)


class EmbeddingWholeTable(Embedding):
    def forward(self, tokens):
        return self.token_embedding(tokens) + self.position_embedding.weight


class EmbeddingConcatenated(Embedding):
    def forward(self, tokens):
        positions = self.position_embedding(torch.arange(tokens.shape[1])).expand(tokens.shape[0], -1, -1)
        return torch.cat([self.token_embedding(tokens), positions], dim=-1)


def test_check_clip_embedding_passes_a_correct_embedding_written_differently():
    assert check_clip_embedding(Embedding)


@pytest.mark.parametrize("cls, mistake", [
    (EmbeddingWithoutPositions, "position embedding is missing"),
    (EmbeddingConcatenated, "concatenated"),
])
def test_check_clip_embedding_names_the_mistake(cls, mistake):
    rejects_in_words(check_clip_embedding, cls, "check_clip_embedding failed", mistake)


def test_check_clip_embedding_names_positions_looked_up_by_token_id():
    # ids of the first input reach 49 > 16 positions: the lookup crashes there, with the hint
    rejects_in_words(check_clip_embedding, EmbeddingPositionsFromIds, "raised IndexError", "0 .. T-1",
                     'hint("3.3")')


def test_check_clip_embedding_explains_a_prompt_shorter_than_the_table():
    rejects(check_clip_embedding, EmbeddingWholeTable, "random input 2 of 3", "T can be shorter than max_tokens")


class EmbeddingPositionsScaled(Embedding):
    def forward(self, tokens):   # the positions counted from 1: a mistake the check does not list
        positions = torch.arange(1, tokens.shape[1] + 1) % self.position_embedding.num_embeddings
        return self.token_embedding(tokens) + self.position_embedding(positions)


def test_check_clip_embedding_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_clip_embedding, EmbeddingPositionsScaled, "3.3")


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.4: the largest gap between sigmoid(c x) and the normal CDF, per scale
# ---------------------------------------------------------------------------------------------------------

def phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def fit_error_with_a_loop(scales, x):
    """Right, written differently: one scale at a time, the CDF from torch.distributions."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return torch.stack([(torch.sigmoid(c * x) - normal.cdf(x)).abs().max() for c in scales])


def fit_error_mean(scales, x):
    return (torch.sigmoid(scales[:, None] * x) - phi(x)).abs().mean(dim=1)


def fit_error_signed(scales, x):
    return (torch.sigmoid(scales[:, None] * x) - phi(x)).max(dim=1).values


def fit_error_erf_without_root_two(scales, x):
    return (torch.sigmoid(scales[:, None] * x) - 0.5 * (1 + torch.erf(x))).abs().amax(dim=1)


def fit_error_of_the_activations(scales, x):
    return (x * torch.sigmoid(scales[:, None] * x) - x * phi(x)).abs().amax(dim=1)


def fit_error_squared(scales, x):   # squares instead of absolute values: a mistake the check does not list
    return ((torch.sigmoid(scales[:, None] * x) - phi(x)) ** 2).amax(dim=1)


def test_check_sigmoid_fit_error_passes_a_correct_measurement_written_differently():
    assert check_sigmoid_fit_error(fit_error_with_a_loop)


def test_the_measured_best_scale_is_quick_gelus_1_702():
    """The measurement the exercise builds finds CLIP's constant: the minimax scale of the logistic fit to Phi."""
    scales = torch.linspace(1.5, 1.9, 4001, dtype=torch.float64)
    gaps = sigmoid_fit_error(scales, torch.linspace(-8, 8, 16001, dtype=torch.float64))
    assert abs(float(scales[gaps.argmin()]) - 1.702) < 1e-3
    assert 0.0094 < float(gaps.min()) < 0.0096


@pytest.mark.parametrize("fn, mistake", [
    (fit_error_mean, "mean gap"),
    (fit_error_signed, "absolute value"),
    (fit_error_erf_without_root_two, "erf(x / sqrt 2)"),
    (fit_error_of_the_activations, "gaps of the activations"),
])
def test_check_sigmoid_fit_error_names_the_mistake(fn, mistake):
    rejects_in_words(check_sigmoid_fit_error, fn, "check_sigmoid_fit_error failed", mistake)


def test_check_sigmoid_fit_error_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_sigmoid_fit_error, fit_error_squared, "3.4")


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.5: the CLIP layer
# ---------------------------------------------------------------------------------------------------------

class Layer(nn.Module):
    """The exercise's constructor; the subclasses get forward wrong in one way each."""

    def __init__(self, width, heads, mlp_width, gelu=quick_gelu):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, mlp_width)
        self.mlp.fc2 = nn.Linear(mlp_width, width)
        self.gelu = gelu

    def feed_forward(self, x):
        return self.mlp.fc2(self.gelu(self.mlp.fc1(x)))

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.feed_forward(self.layer_norm2(x))


class LayerPostNorm(Layer):
    def forward(self, x):
        x = self.layer_norm1(x + self.self_attn(x, causal=True))
        return self.layer_norm2(x + self.feed_forward(x))


class LayerNotCausal(Layer):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.feed_forward(self.layer_norm2(x))


class LayerExactGelu(Layer):
    def __init__(self, width, heads, mlp_width):
        super().__init__(width, heads, mlp_width, gelu=nn.GELU())


class LayerWithoutAttentionResidual(Layer):
    def forward(self, x):
        x = self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.feed_forward(self.layer_norm2(x))


class LayerOneNorm(Layer):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.feed_forward(self.layer_norm1(x))


def test_check_clip_layer_passes_a_correct_layer_written_differently():
    assert check_clip_layer(Layer)


@pytest.mark.parametrize("cls, mistake", [
    (LayerPostNorm, "post-norm"),
    (LayerNotCausal, "no causal mask"),
    (LayerExactGelu, "exact GELU"),
    (LayerWithoutAttentionResidual, "residual around the attention is missing"),
    (LayerOneNorm, "layer_norm1 is used twice"),
])
def test_check_clip_layer_names_the_mistake(cls, mistake):
    rejects_in_words(check_clip_layer, cls, "check_clip_layer failed", mistake)


class LayerSiLU(Layer):
    def __init__(self, width, heads, mlp_width):
        super().__init__(width, heads, mlp_width, gelu=F.silu)


class LayerScaleOutsideTheSigmoid(Layer):
    def __init__(self, width, heads, mlp_width):
        super().__init__(width, heads, mlp_width, gelu=lambda h: 1.702 * h * torch.sigmoid(h))


class LayerTanhGelu(Layer):
    def __init__(self, width, heads, mlp_width):
        super().__init__(width, heads, mlp_width, gelu=nn.GELU(approximate="tanh"))


@pytest.mark.parametrize("cls, mistake", [
    (LayerSiLU, "SiLU"),
    (LayerScaleOutsideTheSigmoid, "1.702 multiplies the result"),
    (LayerTanhGelu, "tanh approximation"),
])
def test_check_clip_layer_names_the_wrong_activation_in_the_mlp(cls, mistake):
    rejects_in_words(check_clip_layer, cls, "check_clip_layer failed", mistake)


class LayerWithoutAttentionBiases(Layer):
    """The constructor built from the diagram, but the attention's q/k/v without the bias CLIP has."""

    def __init__(self, width, heads, mlp_width):
        super().__init__(width, heads, mlp_width)
        self.self_attn = SelfAttention(width, heads, qkv_bias=False)


def test_check_clip_layer_lists_the_weights_a_constructor_is_missing():
    rejects(check_clip_layer, LayerWithoutAttentionBiases, "missing in yours: self_attn.to_q.bias")


class LayerWithTheScaleOnTheAttention(Layer):
    def forward(self, x):   # the attention's output doubled: a mistake the check does not list
        x = x + 2 * self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.feed_forward(self.layer_norm2(x))


def test_check_clip_layer_points_to_the_hints_for_a_mistake_it_does_not_know():
    rejects_unrecognised(check_clip_layer, LayerWithTheScaleOnTheAttention, "3.5")


def test_pick_goes_on_with_the_reference_when_the_layer_is_wrong(capsys):
    assert pick(check_clip_layer, LayerNotCausal, reference=CLIPLayer) is CLIPLayer
    out = capsys.readouterr().out
    assert "no causal mask" in out and "using the reference sd.clip.CLIPLayer" in out


def test_pick_falls_back_when_the_bpe_exercise_is_not_done(capsys):
    def stub(word, ranks):
        raise NotImplementedError("Exercise 3.2: merge the pair with the lowest rank")

    assert pick(check_bpe, stub, reference=bpe) is bpe
    assert "not done yet: Exercise 3.2" in capsys.readouterr().out


def test_the_layers_reference_is_the_real_clip_layer():
    """The check builds sd.clip.CLIPLayer: a layer passing it computes what sd.CLIP's layers compute."""
    torch.manual_seed(0)
    clip = sd.CLIP(sd.CLIPConfig(vocab_size=30, max_tokens=6, width=16, layers=1, heads=2, mlp_width=32)).eval()
    mine = Layer(16, 2, 32)
    mine.load_state_dict(clip.layers[0].state_dict())
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), clip.layers[0](x))
