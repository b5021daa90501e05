"""Checks for notebook 03 (CLIP's text encoder): BPE merge and encoding, embeddings, the quick-GELU fit, the CLIP layer.

The BPE checks compare words (tuples of symbols) with `sd.bpe`; the others compare tensors with `sd.clip` (or, for
the quick-GELU measurement, with the reference below). The `Mistake`s recompute the reference the typical wrong
ways (merging only the first occurrence, picking pairs left to right instead of by rank, the exact GELU, post-norm,
no causal mask, no position embedding, ...), so a wrong answer is named, in words, never as code.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ...bpe import Pair, Word, bpe, learn_merges, merge_pair, word_to_symbols
from ...clip import QUICK_GELU_SCALE, CLIPEmbedding, CLIPLayer, quick_gelu
from .common import (Case, Mistake, _crash_line, _hint_line, _more_help, _unknown_mistake, check_function, check_module,
                     qualified_name, randn, require_callable, seeded)

# More rank look-ups than any correct encoding of the check's words needs: the loop forgot to stop.
MAX_RANK_LOOKUPS = 10_000


# ----------------------------------------------------------------------------------------------------------
# Words, not tensors: a runner for the BPE exercises
# ----------------------------------------------------------------------------------------------------------

class _LoopsForever(BaseException):
    """Raised from inside the learner's loop; a BaseException so that an `except Exception` there cannot hide it."""


class _Ranks(Mapping):
    """The merge ranks (pair -> rank), counting look-ups so that an endless loop ends with a message."""

    def __init__(self, ranks: Mapping[Pair, int]):
        self._ranks = dict(ranks)
        self.lookups = 0

    def __getitem__(self, pair: Pair) -> int:
        self.lookups += 1
        if self.lookups > MAX_RANK_LOOKUPS:
            raise _LoopsForever(f"more than {MAX_RANK_LOOKUPS:,} rank look-ups for one word: the loop does not stop")
        return self._ranks[pair]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __repr__(self) -> str:
        ordered = sorted(self._ranks.items(), key=lambda item: item[1])
        shown = ", ".join(f"{left!r} {right!r}: {rank}" for (left, right), rank in ordered[:6])
        return f"ranks {{{shown}{', ...' if len(ordered) > 6 else ''}}} ({len(ordered)} merges)"


def _check_words(check_name: str, fn: Callable, reference: Callable, cases: Sequence[Case],
                 mistakes: Sequence[Mistake] = (), hint: str = "", reference_name: str | None = None,
                 exercise: str | None = None) -> bool:
    """check_function for functions that return a word (a tuple of symbols); one pass line or AssertionError.

    As `common.check_function`: a known mistake is named in words; otherwise the message says what differs and
    points to hint(exercise).
    """
    require_callable(check_name, fn)
    ref_name = reference_name or qualified_name(reference)
    hint_line = _hint_line(hint) + _unknown_mistake(exercise)
    for i, case in enumerate(cases):
        # the word and the ranks themselves: they are short, and the learner needs them to follow the merges
        inputs = ", ".join(f"{name} {value!r}" for name, value in case.inputs.items())
        where = f"{check_name} failed on example {i + 1} of {len(cases)} ({inputs})"
        # fresh look-up counters for every call: the reference and the mistakes get plain dicts
        plain = {name: dict(v._ranks) if isinstance(v, _Ranks) else v for name, v in case.inputs.items()}
        guarded = {name: _Ranks(plain[name]) if isinstance(v, _Ranks) else v for name, v in case.inputs.items()}
        expected = tuple(reference(**plain))
        try:
            got = fn(*guarded.values())
        except NotImplementedError:
            raise
        except _LoopsForever as e:
            raise AssertionError(f"{where}: {e}\n  Hint: stop as soon as the best pair left is not a learned "
                                 "merge (not among the ranks), and when the word is a single symbol") from None
        except Exception as e:
            raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                 f"{_hint_line(hint)}{_more_help(exercise)}") from e
        if not isinstance(got, tuple) or not all(isinstance(s, str) for s in got):
            raise AssertionError(f"{where}:\n  the output should be a tuple of symbols (str), as the exercise "
                                 f"states, got {type(got).__name__} {got!r}"[:300] + hint_line)
        if tuple(got) != expected:
            named = next((m.hint for m in mistakes if _same_word(m.compute(None, Case(plain)), got)), None)
            raise AssertionError(f"{where}:\n  got {tuple(got)!r}, expected {expected!r} (from {ref_name})"
                                 + (_hint_line(named) if named else hint_line))
    print(f"✅ {check_name} passed: matches {ref_name} on {len(cases)} examples")
    return True


def _same_word(wrong: Any, got: Any) -> bool:
    return wrong is not None and tuple(wrong) == tuple(got)


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.1: one merge step
# ----------------------------------------------------------------------------------------------------------

def _merge(word: Word, pair: Pair, how: str) -> Word:
    """merge_pair done one wrong way."""
    first, second = pair
    if how == "first_only":
        for i in range(len(word) - 1):
            if (word[i], word[i + 1]) == pair:
                return (*word[:i], first + second, *word[i + 2:])
        return word
    if how == "string_replace":   # joining with spaces and replacing text also matches inside symbols
        return tuple(" ".join(word).replace(f"{first} {second}", first + second).split(" "))
    merged, i = [], 0
    while i < len(word) - (1 if how == "drops_last" else 0):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(first + second)
            i += 1 if how == "overlapping" else 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def check_merge_pair(fn) -> bool:
    """Exercise 3.1: fn(word, pair) -> the word with every occurrence of pair joined into one symbol, left to right."""
    cases = [Case({"word": ("l", "o", "w", "e", "r</w>"), "pair": ("e", "r</w>")}),
             Case({"word": ("a", "b", "a", "b", "c</w>"), "pair": ("a", "b")}),
             Case({"word": ("a", "a", "a", "a</w>"), "pair": ("a", "a")}),
             Case({"word": ("he", "ll", "o</w>"), "pair": ("l", "o</w>")}),
             Case({"word": ("c", "a", "t</w>"), "pair": ("d", "o")}),
             Case({"word": ("a</w>",), "pair": ("a", "b")})]

    def wrong(how):
        return lambda ref, c: _merge(c.inputs["word"], c.inputs["pair"], how)

    mistakes = [
        Mistake("only the first occurrence is merged: merge every occurrence of the pair in the word",
                wrong("first_only")),
        Mistake("the last symbol is lost: when the scan ends, a last symbol that was not merged must still go "
                "into the new word", wrong("drops_last")),
        Mistake("a symbol is used in two merges: after a merge, the scan goes on after BOTH joined symbols "
                "(the word a a a a</w> with the pair a a gives aa a a</w>)", wrong("overlapping")),
        Mistake("text replacement also matches inside symbols (the symbols 'll' and 'o</w>' written as text "
                "contain 'l o</w>'): compare whole symbols, one neighbouring pair of symbols at a time",
                wrong("string_replace")),
    ]
    return _check_words("check_merge_pair", fn, merge_pair, cases, mistakes, exercise="3.1",
                        hint="walk through the word once, left to right; where the symbol here and the next one are "
                             "the pair, put the joined symbol in the new word and move on by two, else keep the "
                             "symbol and move on by one; the result is a tuple")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.2: encoding a word
# ----------------------------------------------------------------------------------------------------------

# A toy corpus for learned ranks (its merges are learned by sd.bpe.learn_merges when the check runs).
TOY_CORPUS = {"low": 5, "lower": 2, "newest": 6, "widest": 3, "new": 2, "slower": 1}
TOY_MERGES = 14


def _encode_word(word: Word, ranks: Mapping[Pair, int], how: str) -> Word:
    """bpe done one wrong way."""
    for _ in range(MAX_RANK_LOOKUPS):
        if len(word) < (3 if how == "stops_at_two" else 2):   # stops_at_two: the loop runs while 3+ symbols
            break
        pairs = list(zip(word[:-1], word[1:]))
        known = [p for p in pairs if p in ranks]
        if how == "alphabetical":   # the smallest pair as strings, not by rank
            pair = min(pairs)
            if pair not in ranks:
                break
        elif how == "no_stop":      # the best pair is merged even when it is not a learned merge
            pair = min(pairs, key=lambda p: ranks.get(p, math.inf))
        elif not known:
            break
        elif how == "stops_at_two":
            pair = min(known, key=ranks.__getitem__)
        else:
            pair = {"leftmost": known[0], "max_rank": max(known, key=ranks.__getitem__),
                    "one_merge": min(known, key=ranks.__getitem__)}[how]
        word = merge_pair(word, pair)
        if how == "one_merge":
            break
    return word


def _bpe_cases() -> list[Case]:
    toy = {pair: rank for rank, pair in enumerate(
        learn_merges(Counter({word_to_symbols(w): n for w, n in TOY_CORPUS.items()}), TOY_MERGES))}
    # ranks against the word order: merging by rank, left to right, by the highest rank, by the alphabet, or only
    # once gives five different words
    conflict = {("b", "a"): 0, ("c", "d</w>"): 1, ("a", "cd</w>"): 2, ("ba", "c"): 3}
    return [Case({"word": ("b", "a", "c", "d</w>"), "ranks": _Ranks(conflict)}),
            Case({"word": word_to_symbols("lowest"), "ranks": _Ranks(toy)}),
            Case({"word": word_to_symbols("newer"), "ranks": _Ranks(toy)}),
            # learned words merge all the way into one symbol: a loop that stops at two symbols shows here
            Case({"word": word_to_symbols("newest"), "ranks": _Ranks(toy)}),
            Case({"word": word_to_symbols("lower"), "ranks": _Ranks(toy)}),
            Case({"word": ("x", "y</w>"), "ranks": _Ranks(conflict)}),
            Case({"word": ("a</w>",), "ranks": _Ranks(conflict)})]


def check_bpe(fn) -> bool:
    """Exercise 3.2: fn(word, ranks) -> the word after merging, again and again, its pair with the lowest rank."""
    def wrong(how):
        return lambda ref, c: _encode_word(c.inputs["word"], c.inputs["ranks"], how)

    mistakes = [
        Mistake("pairs are merged from left to right: always merge the pair with the LOWEST rank (the merge "
                "learned first), wherever it is in the word", wrong("leftmost")),
        Mistake("the pair with the highest rank is merged: the lowest rank (learned first) goes first",
                wrong("max_rank")),
        Mistake("the pairs are compared as strings (alphabetically): choose the pair by its rank, counting a "
                "pair that is not among the ranks as infinitely late", wrong("alphabetical")),
        Mistake("only one merge is made: repeat until no pair of the word is a learned merge", wrong("one_merge")),
        Mistake("the loop stops with two symbols left: keep merging while the word has two or more symbols "
                "(a learned word such as 'newest' ends as the single symbol 'newest</w>')", wrong("stops_at_two")),
        Mistake("pairs that are not among the ranks are merged too (the word ends as one symbol): stop as soon as "
                "the best pair left is not a learned merge", wrong("no_stop")),
    ]
    return _check_words("check_bpe", fn, bpe, _bpe_cases(), mistakes, exercise="3.2",
                        hint="while the word has two or more symbols: among its neighbouring pairs take the one "
                             "with the lowest rank (a pair missing from the ranks counts as infinitely late); stop "
                             "if it is not a learned merge, else merge it everywhere and look again")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.3: token and position embeddings
# ----------------------------------------------------------------------------------------------------------

def check_clip_embedding(cls) -> bool:
    """Exercise 3.3: cls(vocab_size, width, max_tokens); forward(tokens (B, T)) -> (B, T, width)."""
    init = {"vocab_size": 50, "width": 8, "max_tokens": 16}
    with seeded(20):
        cases = [Case({"tokens": torch.randint(0, 50, (2, 16))}, init=init),
                 Case({"tokens": torch.randint(0, 16, (2, 5))}, init=init),
                 Case({"tokens": torch.randint(0, 50, (1, 9))}, init={**init, "width": 12})]

    def tokens_and_positions(ref, c):
        tokens = c.inputs["tokens"]
        return ref.token_embedding(tokens), ref.position_embedding(torch.arange(tokens.shape[1]))

    def concatenated(ref, c):
        tok, pos = tokens_and_positions(ref, c)
        return torch.cat([tok, pos.expand_as(tok)], dim=-1)

    mistakes = [
        Mistake("the position embedding is missing: add the vector of each position 0 .. T-1 to the token "
                "embeddings, or the layers above cannot tell 'red circle' from 'circle red' by position",
                lambda ref, c: tokens_and_positions(ref, c)[0]),
        Mistake("the position embedding is looked up with the token ids: look it up with the positions "
                "0, 1, ..., T-1, T being the number of tokens in the input",
                lambda ref, c: ref.token_embedding(c.inputs["tokens"]) + ref.position_embedding(c.inputs["tokens"])),
        Mistake("only the position embedding is returned: add the token embeddings to it",
                lambda ref, c: tokens_and_positions(ref, c)[1].expand(c.inputs["tokens"].shape[0], -1, -1)),
        Mistake("the embeddings are concatenated: CLIP adds the token's vector and the position's vector, "
                "keeping the width", concatenated),
    ]
    return check_module("check_clip_embedding", cls, CLIPEmbedding, cases, mistakes, exercise="3.3",
                        hint="the positions are 0 .. T-1 with T the number of tokens of the input (T can be "
                             "shorter than max_tokens); the output is the token embedding plus the position "
                             "embedding, of the same width")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.4: where quick-GELU's 1.702 comes from (a measurement)
# ----------------------------------------------------------------------------------------------------------

def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), the standard normal distribution's CDF: the gate of the exact GELU, x * Phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def sigmoid_fit_error(scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(S,) scales c and (N,) points x -> (S,): the largest |sigmoid(c x) - Phi(x)| over the points, for each c."""
    gates = torch.sigmoid(scales[:, None] * x[None, :])        # (S, 1) * (1, N) -> (S, N)
    return (gates - normal_cdf(x)[None, :]).abs().amax(dim=1)   # (S, N) -> (S,)


def check_sigmoid_fit_error(fn) -> bool:
    """Exercise 3.4: fn(scales (S,), x (N,)) -> (S,), the largest gap between sigmoid(c x) and Phi(x) over x."""
    with seeded(21):
        cases = [Case({"scales": torch.tensor([1.0, 1.596, QUICK_GELU_SCALE, 2.5]), "x": torch.linspace(-6, 6, 241)}),
                 Case({"scales": 0.5 + 2 * torch.rand(5), "x": 3 * randn(50)}),
                 Case({"scales": torch.tensor([QUICK_GELU_SCALE]), "x": torch.tensor([-2.0, -0.5, 0.0, 0.4, 1.5])})]

    def gap(gate=torch.sigmoid, cdf=normal_cdf, reduce="max", absolute=True, times_x=False):
        def compute(ref, c):
            s, x = c.inputs["scales"][:, None], c.inputs["x"][None, :]
            diff = gate(s * x) - cdf(x)
            diff = x * diff if times_x else diff
            diff = diff.abs() if absolute else diff
            return diff.amax(dim=1) if reduce == "max" else diff.mean(dim=1)
        return compute

    mistakes = [
        Mistake("this is the mean gap over the points: the exercise asks for the largest one, the worst point "
                "for each scale", gap(reduce="mean")),
        Mistake("the gap has a sign: take its absolute value before the maximum, or points where the sigmoid "
                "is below Phi(x) are never counted", gap(absolute=False)),
        Mistake("Phi is computed as (1 + erf(x)) / 2: the normal CDF is (1 + erf(x / sqrt 2)) / 2",
                gap(cdf=lambda x: 0.5 * (1 + torch.erf(x)))),
        Mistake("these are the gaps of the activations, x sigmoid(c x) against x Phi(x): the exercise compares "
                "the gates, sigmoid(c x) against Phi(x)", gap(times_x=True)),
        Mistake("the scale multiplies the sigmoid's output: it stretches its input, sigmoid(c x)",
                lambda ref, c: (c.inputs["scales"][:, None] * torch.sigmoid(c.inputs["x"][None, :])
                                - normal_cdf(c.inputs["x"])[None, :]).abs().amax(dim=1)),
    ]
    return check_function("check_sigmoid_fit_error", fn, sigmoid_fit_error, cases, mistakes, exercise="3.4",
                          reference_name="the reference measurement (the largest gap between sigmoid(c x) and Phi(x), per scale)",
                          hint="for every scale c and every point x, the absolute difference between sigmoid(c x) "
                               "and Phi(x) = (1 + erf(x / sqrt 2)) / 2; then the largest over the points, one "
                               "number per scale")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.5: the CLIP layer, built from its diagram (with quick-GELU in its MLP)
# ----------------------------------------------------------------------------------------------------------

def _clip_layer(ref, x, norm: str = "pre", causal: bool = True, gelu: str = "quick", attn_residual: bool = True,
                mlp_residual: bool = True) -> torch.Tensor:
    """The reference CLIP layer's forward, with one thing done the wrong way (its weights)."""
    act = {"quick": quick_gelu, "exact": F.gelu, "tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu,
           "scaled_result": lambda y: QUICK_GELU_SCALE * y * torch.sigmoid(y), "no_x": lambda y: torch.sigmoid(
               QUICK_GELU_SCALE * y), "relu": F.relu}[gelu]

    def mlp(h):
        return ref.mlp.fc2(act(ref.mlp.fc1(h)))

    if norm == "post":   # the original Transformer's order: sublayer, residual, then LayerNorm
        x = ref.layer_norm1(x + ref.self_attn(x, causal=causal))
        return ref.layer_norm2(x + mlp(x))
    ln2 = ref.layer_norm1 if norm == "shared" else ref.layer_norm2
    h = ref.self_attn(ref.layer_norm1(x), causal=causal)
    x = x + h if attn_residual else h
    h = mlp(ln2(x))
    return x + h if mlp_residual else h


def check_clip_layer(cls) -> bool:
    """Exercise 3.5: cls(width, heads, mlp_width) with layer_norm1, self_attn, layer_norm2, mlp.fc1, mlp.fc2;
    forward(x (B, T, C)) -> (B, T, C), pre-norm and causal, quick-GELU in the MLP."""
    with seeded(22):
        cases = [Case({"x": randn(2, 7, 16)}, init={"width": 16, "heads": 2, "mlp_width": 64}),
                 Case({"x": randn(1, 5, 32)}, init={"width": 32, "heads": 4, "mlp_width": 128})]

    def wrong(**how):
        return lambda ref, c: _clip_layer(ref, c.inputs["x"], **how)

    mistakes = [
        Mistake("there is no causal mask: token i must only see tokens 0 .. i (the attention's causal option)",
                wrong(causal=False)),
        Mistake("the LayerNorms come after the residual sums (post-norm): CLIP is pre-norm, each part works on "
                "its normalised input and adds its result to the unnormalised x", wrong(norm="post")),
        Mistake("the MLP uses the exact GELU, x Phi(x): CLIP's MLP uses quick-GELU, x sigmoid(1.702 x), and its "
                "weights give CLIP's numbers only with it", wrong(gelu="exact")),
        Mistake("the MLP uses the tanh approximation of GELU: CLIP's is quick-GELU, x sigmoid(1.702 x)",
                wrong(gelu="tanh")),
        Mistake("the MLP uses SiLU, x sigmoid(x): quick-GELU scales the sigmoid's input by 1.702",
                wrong(gelu="silu")),
        Mistake("in the MLP, 1.702 multiplies the result: it scales the sigmoid's input, x sigmoid(1.702 x)",
                wrong(gelu="scaled_result")),
        Mistake("in the MLP, the factor x is missing: quick-GELU is x times sigmoid(1.702 x), a gate on x",
                wrong(gelu="no_x")),
        Mistake("the MLP uses ReLU: CLIP's is quick-GELU, x sigmoid(1.702 x)", wrong(gelu="relu")),
        Mistake("the residual around the attention is missing: add the attention's output to x",
                wrong(attn_residual=False)),
        Mistake("the residual around the MLP is missing: add the MLP's output to x", wrong(mlp_residual=False)),
        Mistake("layer_norm1 is used twice: the MLP's input goes through layer_norm2", wrong(norm="shared")),
    ]
    # check_module gives each LayerNorm its own random scale and shift, so a swapped or shared norm shows
    return check_module("check_clip_layer", cls, CLIPLayer, cases, mistakes, exercise="3.5",
                        hint="pre-norm and causal: x plus the causal self-attention of layer_norm1 of x; then that "
                             "plus the MLP of its layer_norm2, the MLP being fc1, quick-GELU, fc2")
