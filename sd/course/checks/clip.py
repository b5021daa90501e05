"""Checks for notebook 03 (CLIP's text encoder): BPE merge and encoding, embeddings, quick-GELU, the CLIP layer.

The BPE checks compare words (tuples of symbols) with `sd.bpe`; the others compare tensors with `sd.clip`. The
`Mistake`s below recompute the reference the typical wrong ways (merging only the first occurrence, picking pairs
left to right instead of by rank, exact GELU, post-norm, no causal mask, no position embedding, ...), so a wrong
answer is named, not just reported.
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
from .common import (Case, Mistake, check_function, check_module, qualified_name, randn, require_callable,
                     seeded)

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
                 mistakes: Sequence[Mistake] = (), hint: str = "", reference_name: str | None = None) -> bool:
    """check_function for functions that return a word (a tuple of symbols); one pass line or AssertionError."""
    require_callable(check_name, fn)
    ref_name = reference_name or qualified_name(reference)
    hint_line = f"\n  Hint: {hint}" if hint else ""
    for i, case in enumerate(cases):
        where = f"{check_name} failed on example {i + 1} of {len(cases)} ({case.describe()})"
        # fresh look-up counters for every call: the reference and the mistakes get plain dicts
        plain = {name: dict(v._ranks) if isinstance(v, _Ranks) else v for name, v in case.inputs.items()}
        guarded = {name: _Ranks(plain[name]) if isinstance(v, _Ranks) else v for name, v in case.inputs.items()}
        expected = tuple(reference(**plain))
        try:
            got = fn(*guarded.values())
        except NotImplementedError:
            raise
        except _LoopsForever as e:
            raise AssertionError(f"{where}: {e}\n  Hint: stop when no pair of the word is in ranks "
                                 "(`if pair not in ranks: break`), and when the word is a single symbol") from None
        except Exception as e:
            raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{hint_line}") from e
        if not isinstance(got, tuple) or not all(isinstance(s, str) for s in got):
            raise AssertionError(f"{where}:\n  the output should be a tuple of symbols (str), as the exercise "
                                 f"states, got {type(got).__name__} {got!r}"[:300] + hint_line)
        if tuple(got) != expected:
            named = next((m.hint for m in mistakes if _same_word(m.compute(None, Case(plain)), got)), None)
            raise AssertionError(f"{where}:\n  got {tuple(got)!r}, expected {expected!r} (from {ref_name})"
                                 + (f"\n  Hint: {named}" if named else hint_line))
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
        Mistake("the last symbol is lost: when the scan ends, the symbol at the end that was not merged must "
                "still be appended", wrong("drops_last")),
        Mistake("a symbol is used in two merges: after merging word[i] and word[i+1], continue at i + 2 "
                "(('a', 'a', 'a', 'a</w>') with ('a', 'a') gives ('aa', 'a', 'a</w>'))", wrong("overlapping")),
        Mistake("text replacement also matches inside symbols ('ll o</w>' contains 'l o</w>'): compare whole "
                "symbols, word[i] == first and word[i + 1] == second", wrong("string_replace")),
    ]
    return _check_words("check_merge_pair", fn, merge_pair, cases, mistakes,
                        hint="scan i = 0, 1, ...: if word[i] == pair[0] and word[i + 1] == pair[1], append the "
                             "joined symbol and skip 2, else append word[i] and skip 1; return a tuple")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.2: encoding a word
# ----------------------------------------------------------------------------------------------------------

# A toy corpus for learned ranks (its merges are learned by sd.bpe.learn_merges when the check runs).
TOY_CORPUS = {"low": 5, "lower": 2, "newest": 6, "widest": 3, "new": 2, "slower": 1}
TOY_MERGES = 14


def _encode_word(word: Word, ranks: Mapping[Pair, int], how: str) -> Word:
    """bpe done one wrong way."""
    for _ in range(MAX_RANK_LOOKUPS):
        if len(word) < (3 if how == "stops_at_two" else 2):   # stops_at_two: `while len(word) > 2`
            break
        pairs = list(zip(word[:-1], word[1:]))
        known = [p for p in pairs if p in ranks]
        if how == "alphabetical":   # min(pairs) without key= compares the strings
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
        Mistake("the pair with the highest rank is merged: the lowest rank (learned first) goes first, "
                "min(..., key=lambda p: ranks.get(p, math.inf))", wrong("max_rank")),
        Mistake("the pair is chosen without key=: min(pairs) compares the strings; choose by rank, "
                "min(pairs, key=lambda p: ranks.get(p, math.inf))", wrong("alphabetical")),
        Mistake("only one merge is made: repeat until no pair of the word is in ranks", wrong("one_merge")),
        Mistake("the loop stops with two symbols left: keep merging while the word has two or more symbols "
                "(a learned word such as 'newest' ends as the single symbol 'newest</w>')", wrong("stops_at_two")),
        Mistake("pairs that are not in ranks are merged too (the word ends as one symbol): stop as soon as the "
                "best pair is not a learned merge, `if pair not in ranks: break`", wrong("no_stop")),
    ]
    return _check_words("check_bpe", fn, bpe, _bpe_cases(), mistakes,
                        hint="while the word has 2+ symbols: pair = min(get_pairs(word), key=lambda p: "
                             "ranks.get(p, math.inf)); stop if pair not in ranks; word = merge_pair(word, pair)")


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
        Mistake("the position embedding is missing: add position_embedding(torch.arange(T)) to the token "
                "embeddings, or the transformer cannot tell 'red circle' from 'circle red'",
                lambda ref, c: tokens_and_positions(ref, c)[0]),
        Mistake("the position embedding is looked up with the token ids: look it up with the positions "
                "0..T-1, torch.arange(tokens.shape[1])",
                lambda ref, c: ref.token_embedding(c.inputs["tokens"]) + ref.position_embedding(c.inputs["tokens"])),
        Mistake("only the position embedding is returned: add the token embeddings to it",
                lambda ref, c: tokens_and_positions(ref, c)[1].expand(c.inputs["tokens"].shape[0], -1, -1)),
        Mistake("the embeddings are concatenated: CLIP adds them, token_embedding(tokens) + "
                "position_embedding(positions), keeping the width", concatenated),
    ]
    return check_module("check_clip_embedding", cls, CLIPEmbedding, cases, mistakes,
                        hint="positions = torch.arange(T) with T = tokens.shape[1] (T can be shorter than "
                             "max_tokens); return token_embedding(tokens) + position_embedding(positions)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.4: quick-GELU
# ----------------------------------------------------------------------------------------------------------

def check_quick_gelu(fn) -> bool:
    """Exercise 3.4: fn(x) = x * sigmoid(1.702 x), elementwise."""
    with seeded(21):
        cases = [Case({"x": 3 * randn(4, 7)}), Case({"x": randn(2, 3, 5)}), Case({"x": torch.linspace(-6, 6, 25)})]

    def wrong(f):
        return lambda ref, c: f(c.inputs["x"])

    mistakes = [
        Mistake("this is the exact GELU, x * Phi(x) (F.gelu): CLIP was trained with quick-GELU, "
                "x * sigmoid(1.702 x), and the weights only give CLIP's numbers with it", wrong(F.gelu)),
        Mistake("this is the tanh approximation of GELU: CLIP uses quick-GELU, x * sigmoid(1.702 x)",
                wrong(lambda x: F.gelu(x, approximate="tanh"))),
        Mistake("this is SiLU, x * sigmoid(x): the sigmoid's input is scaled, x * sigmoid(1.702 x)",
                wrong(F.silu)),
        Mistake("the factor x is missing: quick-GELU is x * sigmoid(1.702 x), not sigmoid(1.702 x)",
                wrong(lambda x: torch.sigmoid(QUICK_GELU_SCALE * x))),
        Mistake("1.702 multiplies the result: it scales the sigmoid's input, x * sigmoid(1.702 x)",
                wrong(lambda x: QUICK_GELU_SCALE * x * torch.sigmoid(x))),
    ]
    return check_function("check_quick_gelu", fn, quick_gelu, cases, mistakes,
                          hint="return x * torch.sigmoid(1.702 * x)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 3.5: the CLIP layer
# ----------------------------------------------------------------------------------------------------------

def _clip_layer(ref, x, norm: str = "pre", causal: bool = True, gelu: str = "quick", attn_residual: bool = True,
                mlp_residual: bool = True) -> torch.Tensor:
    """The reference CLIP layer's forward, with one thing done the wrong way (its weights)."""
    act = {"quick": quick_gelu, "exact": F.gelu}[gelu]

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
    """Exercise 3.5: cls(width, heads, mlp_width); forward(x (B, T, C)) -> (B, T, C), pre-norm and causal."""
    with seeded(22):
        cases = [Case({"x": randn(2, 7, 16)}, init={"width": 16, "heads": 2, "mlp_width": 64}),
                 Case({"x": randn(1, 5, 32)}, init={"width": 32, "heads": 4, "mlp_width": 128})]
    def wrong(**how):
        return lambda ref, c: _clip_layer(ref, c.inputs["x"], **how)

    mistakes = [
        Mistake("there is no causal mask: token i must only see tokens 0..i, self_attn(h, causal=True)",
                wrong(causal=False)),
        Mistake("the LayerNorms come after the residual sums (post-norm): CLIP is pre-norm, "
                "x = x + self_attn(layer_norm1(x)), then x = x + mlp(layer_norm2(x))", wrong(norm="post")),
        Mistake("the MLP uses the exact GELU: CLIP's is quick-GELU, x * sigmoid(1.702 x)", wrong(gelu="exact")),
        Mistake("the residual around the attention is missing: x = x + self_attn(layer_norm1(x), causal=True)",
                wrong(attn_residual=False)),
        Mistake("the residual around the MLP is missing: return x + mlp(layer_norm2(x))",
                wrong(mlp_residual=False)),
        Mistake("layer_norm1 is used twice: the MLP's input goes through layer_norm2", wrong(norm="shared")),
    ]
    # check_module gives each LayerNorm its own random scale and shift, so a swapped or shared norm shows
    return check_module("check_clip_layer", cls, CLIPLayer, cases, mistakes,
                        hint="x = x + self_attn(layer_norm1(x), causal=True); "
                             "return x + fc2(quick_gelu(fc1(layer_norm2(x))))")

