"""CLIP's tokenizer: how SD v1 turns a prompt into 77 token ids.

The steps (openai/CLIP, simple_tokenizer.py; Radford et al. 2021):
1. clean the text: repair broken Unicode (ftfy), unescape HTML, collapse whitespace, lowercase;
2. cut it into words with CLIP's regular expression (letters, single digits, runs of punctuation);
3. encode each word with byte-level BPE (`sd/bpe.py`), its last symbol marked with '</w>';
4. add the start and end tokens, then pad with the end token (SD v1) or truncate to 77.

The vocabulary is built the same way for CLIP's own merges and for merges learned from a small corpus:
the 256 byte symbols, the same with '</w>', one token per merge, then the two special tokens
(for CLIP: 256 + 256 + 48,894 + 2 = 49,408).

CLIP's merges file `bpe_simple_vocab_16e6.txt.gz` (openai/CLIP, MIT license) ships in `sd/assets/`: that is
the vocabulary when no path is given. A model's own `tokenizer/` folder is read when given, in either layout
transformers writes: vocab.json + merges.txt (the slow tokenizer's files, older diffusers folders), or
tokenizer.json alone (the fast tokenizer's one file, what today's `save_pretrained` writes).
"""
from __future__ import annotations

import gzip
import html
import json
import warnings
from collections import Counter
from pathlib import Path

import ftfy
import regex
import torch

from .bpe import END_OF_WORD, NUM_BYTES, BYTE_ENCODER, Pair, bpe, learn_merges, symbols_to_bytes, word_to_symbols
from .config import CLIP_MAX_TOKENS, CLIP_VOCAB_SIZE

# Special tokens, named as in CLIP's vocabulary (openai/CLIP simple_tokenizer.py; vocab.json of SD v1).
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
# CLIP keeps only the first merges of its file: 49,408 - 2 x 256 - 2 = 48,894
# (simple_tokenizer.py: `merges[1:49152-256-2+1]`).
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * NUM_BYTES - len(SPECIAL_TOKENS)

# CLIP's merges file (openai/CLIP's clip/bpe_simple_vocab_16e6.txt.gz, MIT), shipped in this package; its license
# and checksum are in assets/bpe_simple_vocab_16e6.LICENSE.txt.
CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES_PATH = Path(__file__).resolve().parent / "assets" / CLIP_MERGES_FILE
# The diffusers/transformers tokenizer folder layouts: the slow tokenizer's two files, or the fast one's one file.
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
FAST_TOKENIZER_FILE = "tokenizer.json"
MERGES_HEADER = "#version: 0.2"   # first line of a merges file (CLIP's gz has it after a file name)

# CLIP's word splitter (simple_tokenizer.py): the special tokens, English contractions, runs of
# letters, single digits, runs of anything else that is not whitespace.
CLIP_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")

HOW_TO_GET_VOCABULARY = (
    f"pass CLIPTokenizer(path) a checkpoint's tokenizer/ folder ({VOCAB_FILE} + {MERGES_FILE}, or "
    f"{FAST_TOKENIZER_FILE}) or the path of CLIP's merges file {CLIP_MERGES_FILE}"
)


def clean_text(text: str) -> str:
    """CLIP's cleanup: repair broken Unicode (ftfy), unescape HTML twice, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))   # also entities ftfy keeps (text with tags), as CLIP's basic_clean
    text = WHITESPACE.sub(" ", text).strip()
    return text.lower()


def pre_tokenize(text: str) -> list[str]:
    """Clean the text and cut it into CLIP's words: 'A cat, sitting!' -> ['a', 'cat', ',', 'sitting', '!']."""
    return CLIP_WORD_PATTERN.findall(clean_text(text))


def build_vocab(merges: list[Pair]) -> dict[str, int]:
    """CLIP's vocabulary: byte symbols, the same with '</w>', one token per merge, then the two specials."""
    byte_symbols = list(BYTE_ENCODER.values())
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, *SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))   # two merges can spell the same token: it keeps its first id
    return vocab


def read_merges(path: str | Path, max_merges: int | None = None) -> list[Pair]:
    """Read a merges file (plain or .gz): one 'left right' pair per line after the '#version' header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a BPE merges file (UTF-8 text, optionally gzipped): {e}") from None
    start = 1 if lines and MERGES_HEADER in lines[0] else 0
    merges = []
    for line_number, line in enumerate(lines[start:], start=start + 1):
        if max_merges is not None and len(merges) == max_merges:
            break
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{path}, line {line_number}: expected a merge 'left right', got {line[:80]!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _load_folder(folder: Path) -> tuple[dict[str, int], list[Pair]]:
    """Read a tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json); a model folder holding tokenizer/ too."""
    if not _holds_tokenizer(folder) and _holds_tokenizer(folder / "tokenizer"):
        folder = folder / "tokenizer"
    if (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
        return _read_vocab_json(folder / VOCAB_FILE), read_merges(folder / MERGES_FILE)
    if (folder / FAST_TOKENIZER_FILE).is_file():
        return read_fast_tokenizer_file(folder / FAST_TOKENIZER_FILE)
    missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (folder / name).is_file()]
    raise ValueError(f"tokenizer folder {folder} should hold {VOCAB_FILE} and {MERGES_FILE}, or "
                     f"{FAST_TOKENIZER_FILE}; missing: {missing}")


def _holds_tokenizer(folder: Path) -> bool:
    return (folder / VOCAB_FILE).is_file() or (folder / FAST_TOKENIZER_FILE).is_file()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from None


def _read_vocab_json(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{path} should map token -> id, got a {type(vocab).__name__}")
    return vocab


def read_fast_tokenizer_file(path: Path) -> tuple[dict[str, int], list[Pair]]:
    """Vocabulary and merges of a fast tokenizer's tokenizer.json (the `tokenizers` library's format).

    Its "model" holds both: {"type": "BPE", "vocab": {token: id}, "merges": [...], "end_of_word_suffix": "</w>"};
    the merges are "left right" strings (tokenizers < 0.20) or ["left", "right"] pairs (newer).
    """
    model = _read_json(path)
    model = model.get("model") if isinstance(model, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path} is not a CLIP tokenizer: expected a BPE model whose words end with "
                         f"{END_OF_WORD!r} (CLIP's byte-level BPE)")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ValueError(f"{path}: its model should hold a vocab (token -> id) and a list of merges")
    pairs = []
    for number, merge in enumerate(merges, start=1):
        pair = merge.split() if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{path}: merge {number} should be a pair 'left right', got {merge!r:.80}")
        pairs.append((pair[0], pair[1]))
    return vocab, pairs


def load_vocabulary(path: str | Path | None = None) -> tuple[dict[str, int], list[Pair]]:
    """Vocabulary and merges from a tokenizer/ folder, a merges file, or (no path) CLIP's file shipped in sd/assets."""
    if path is None:
        path = CLIP_MERGES_PATH
        if not path.is_file():
            raise FileNotFoundError(f"CLIP's merges file {path} is missing from this installation of the sd package "
                                    "(reinstall it: pip install -e .); or " + HOW_TO_GET_VOCABULARY)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer vocabulary at {path}: {HOW_TO_GET_VOCABULARY}")
    if path.is_dir():
        return _load_folder(path)
    if path.name in (VOCAB_FILE, FAST_TOKENIZER_FILE):
        return _load_folder(path.parent)
    merges = read_merges(path, max_merges=CLIP_NUM_MERGES)
    if not merges:
        raise ValueError(f"{path} holds no BPE merges: {HOW_TO_GET_VOCABULARY}")
    return build_vocab(merges), merges


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: text -> ids, and a batch of prompts -> (B, 77) LongTensor for SD v1."""

    def __init__(self, path: str | Path | None = None, max_length: int = CLIP_MAX_TOKENS):
        vocab, merges = load_vocabulary(path)
        self._setup(vocab, merges, max_length)

    @classmethod
    def from_merges(cls, merges: list[Pair], max_length: int = CLIP_MAX_TOKENS) -> CLIPTokenizer:
        """A tokenizer for merges learned on your own corpus (`learn_bpe_merges`), vocabulary built as CLIP's."""
        merges = [tuple(m) for m in merges]
        tokenizer = cls.__new__(cls)
        tokenizer._setup(build_vocab(merges), merges, max_length)
        return tokenizer

    def _setup(self, vocab: dict[str, int], merges: list[Pair], max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens (>= 2), got {max_length}")
        unknown = [t for t in [*BYTE_ENCODER.values(), *SPECIAL_TOKENS, *("".join(m) for m in merges)]
                   if t not in vocab]
        if unknown:
            raise ValueError(f"vocabulary does not match its merges: {len(unknown)} tokens missing, e.g. {unknown[:5]}")
        self.vocab = vocab                                       # token -> id
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.merges = list(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}   # earlier learned = applied first
        self.max_length = max_length
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = self.eos_id        # SD v1 pads with the end token (SD 2 pads with 0)
        self._cache: dict[str, tuple[int, ...]] = {}             # word -> ids: prompts repeat words a lot
        # words added after training (textual inversion): matched in the cleaned text before BPE, each -> its ids
        self.added_tokens: dict[str, tuple[int, ...]] = {}
        self._added_pattern: regex.Pattern | None = None

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids (49,408 for CLIP)."""
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, max_length={self.max_length})"

    def encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word: its byte symbols, merged by BPE (cached)."""
        if word not in self._cache:
            if word in SPECIAL_TOKENS:
                ids = (self.vocab[word],)
            else:
                ids = tuple(self.vocab[s] for s in bpe(word_to_symbols(word), self.ranks))
            self._cache[word] = ids
        return self._cache[word]

    def add_token(self, word: str, num_vectors: int = 1) -> list[int]:
        """Add `word` (e.g. "<cat-toy>") as num_vectors new ids; then `word` in a prompt gives all of them.

        As in diffusers' textual inversion, the extra vectors are the tokens `word_1`, `word_2`, ..., usable alone too.
        """
        names = [word] + [f"{word}_{i}" for i in range(1, num_vectors)]
        taken = [n for n in names if n in self.vocab or clean_text(n) in self.added_tokens]
        if not word.strip() or taken:
            reason = f"{taken} already in the vocabulary" if taken else "it is empty"
            raise ValueError(f"cannot add token {word!r}: {reason}")
        ids = list(range(len(self.vocab), len(self.vocab) + len(names)))
        for name, i in zip(names, ids):
            self.vocab[name], self.id_to_token[i] = i, name
            self.added_tokens[clean_text(name)] = (i,)
        self.added_tokens[clean_text(word)] = tuple(ids)
        # the longest first, so that "<t>_1" is not read as "<t>" followed by "_1"
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = regex.compile("(" + "|".join(regex.escape(a) for a in alternatives) + ")")
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, from the start token 49406 to the end token 49407, not padded or truncated."""
        if not isinstance(text, str):
            raise ValueError(f"expected a text (str), got {type(text).__name__}")
        ids = [self.bos_id]
        text = clean_text(text)
        # added words split the text first (the split keeps them at odd positions); the rest goes through BPE
        pieces = self._added_pattern.split(text) if self._added_pattern else [text]
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.extend(self.added_tokens[piece])
                continue
            for word in CLIP_WORD_PATTERN.findall(piece):
                ids.extend(self.encode_word(word))
        ids.append(self.eos_id)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of a text as strings, without start and end: 'a cat' -> ['a</w>', 'cat</w>']."""
        return [self.id_to_token[i] for i in self.encode(text)[1:-1]]

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a list of ids (or a 1-D tensor); words end where a token ends with '</w>'."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i not in self.id_to_token:
                raise ValueError(f"id {i} is not in the vocabulary (0..{self.vocab_size - 1})")
            token = self.id_to_token[i]
            if token in SPECIAL_TOKENS:
                if not skip_special_tokens:
                    out += token.encode("utf-8")
                continue
            ends_word = token.endswith(END_OF_WORD)
            out += symbols_to_bytes(token[: -len(END_OF_WORD)] if ends_word else token)
            if ends_word:
                out += b" "
        # a token can hold part of a multi-byte character: decode the bytes only once they are all joined
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: list[str] | str) -> torch.LongTensor:
        """Encode prompts into a (B, max_length) LongTensor: padded with the end token, long ones truncated."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"expected a text or a list of texts, got {type(texts).__name__}")
        rows = []
        for index, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.max_length:
                # keep the end token at the last position, as CLIP and SD v1 read the prompt up to it
                dropped = ids[self.max_length - 1 : -1]
                ids = ids[: self.max_length - 1] + [self.eos_id]
                warnings.warn(
                    f"prompt {index} is longer than {self.max_length} tokens (start and end included); "
                    f"dropped the end of it: {self.decode(dropped)!r}",
                    stacklevel=2,
                )
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        # list of B rows of max_length ids -> (B, max_length)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def save(self, path: str | Path) -> Path:
        """Write a tokenizer/ folder (vocab.json + merges.txt) that CLIPTokenizer(path) and transformers can read."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / VOCAB_FILE).write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in self.merges)]
        (folder / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder


def learn_bpe_merges(texts: list[str], num_merges: int) -> list[Pair]:
    """Learn BPE merges from a corpus with CLIP's cleanup, word splitting, bytes and '</w>' markers."""
    if isinstance(texts, str):
        raise ValueError("learn_bpe_merges expects a list of texts, got a single str")
    word_counts = Counter(
        word_to_symbols(word) for text in texts for word in pre_tokenize(text) if word not in SPECIAL_TOKENS
    )
    return learn_merges(word_counts, num_merges)
