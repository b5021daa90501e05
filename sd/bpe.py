"""Byte-pair encoding on bytes: the generic algorithm behind GPT-2's and CLIP's tokenizers.

BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts
from single symbols and learns, one step at a time, which adjacent pair to glue into a new symbol.
Working on the UTF-8 *bytes* of the text (Radford et al. 2019, GPT-2) means any text can be encoded:
there is no "unknown" symbol.

A word is a tuple of symbols (strings). CLIP marks the end of each word on its last symbol, so
"cat" starts as ('c', 'a', 't</w>') and can never merge with the next word.

Learning:  count adjacent pairs over a corpus, merge the most frequent, repeat (`learn_merges`).
Encoding:  replay the learned merges, always the earliest-learned pair first (`bpe`).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

# CLIP's end-of-word marker on the last symbol of a word (openai/CLIP, simple_tokenizer.py).
END_OF_WORD = "</w>"
# A byte has 2^8 values.
NUM_BYTES = 256

Word = tuple[str, ...]
Pair = tuple[str, str]


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte value to a printable character, so that BPE can work on ordinary strings (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are
    moved to the characters 256, 257, ... in byte order. The dict order (printable bytes first) is the
    order of the first 256 vocabulary entries of GPT-2 and CLIP.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),   # 33..126: ASCII without space
        *range(ord("¡"), ord("¬") + 1),   # 161..172
        *range(ord("®"), ord("ÿ") + 1),   # 174..255 (173 is the invisible soft hyphen)
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(NUM_BYTES):
        if b not in table:
            table[b] = chr(NUM_BYTES + shifted)
            shifted += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {char: b for b, char in BYTE_ENCODER.items()}


def word_to_symbols(word: str) -> Word:
    """Split a word into one symbol per UTF-8 byte, marking the last one: 'cat' -> ('c', 'a', 't</w>')."""
    assert word, "a word has at least one character"
    symbols = [BYTE_ENCODER[b] for b in word.encode("utf-8")]
    return (*symbols[:-1], symbols[-1] + END_OF_WORD)


def symbols_to_bytes(symbols: Sequence[str]) -> bytes:
    """Undo the byte mapping: ('c', 'a', 't') -> b'cat' (end-of-word markers must be removed first)."""
    return bytes(BYTE_DECODER[char] for symbol in symbols for char in symbol)


def get_pairs(word: Word) -> set[Pair]:
    """All adjacent symbol pairs of a word: ('c', 'a', 't</w>') -> {('c', 'a'), ('a', 't</w>')}."""
    return set(zip(word[:-1], word[1:]))


def merge_pair(word: Word, pair: Pair) -> Word:
    """One merge step: replace every occurrence of `pair` by the joined symbol, scanning left to right.

    Occurrences do not overlap: merging ('a', 'a') in ('a', 'a', 'a') gives ('aa', 'a').
    """
    first, second = pair
    merged = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def bpe(word: Word, ranks: Mapping[Pair, int]) -> Word:
    """Encode one word: apply the merges it contains, always the lowest rank (earliest learned) first."""
    while len(word) > 1:
        pair = min(get_pairs(word), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:   # no known merge left in this word
            break
        word = merge_pair(word, pair)
    return word


def learn_merges(word_counts: Mapping[Word, int], num_merges: int) -> list[Pair]:
    """Learn up to `num_merges` merges from words with their corpus frequencies (Sennrich et al. 2016, alg. 1).

    Each step counts every adjacent pair, weighted by how often its word occurs, and merges the most
    frequent one everywhere. Ties go to the pair that sorts first, so the result is deterministic.
    Stops early when every word has become a single symbol.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    words = dict(word_counts)
    merges: list[Pair] = []
    for _ in range(num_merges):
        pair_counts: Counter[Pair] = Counter()
        for word, count in words.items():
            for pair in zip(word[:-1], word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))   # most frequent, then sorts first
        merges.append(best)
        words = {merge_pair(word, best): count for word, count in words.items()}
    return merges
