"""The project's CLIP tokenizer against transformers' CLIPTokenizer on CLIP's real vocabulary.

transformers cannot download here, so a fixture writes a tokenizer/ folder (vocab.json + merges.txt)
from CLIP's merges file with its own code (the standard construction of openai/CLIP), and
transformers reads that folder. The project's tokenizer reads the .gz file directly (the copy shipped in
sd/assets, checked against the size and sha256 of openai/CLIP's file).
"""
import gzip
import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import sd.tokenizer as sd_tokenizer
from sd.bpe import bpe, get_pairs, merge_pair
from sd.tokenizer import CLIPTokenizer, learn_bpe_merges

SOT, EOT = 49406, 49407   # CLIP's <|startoftext|> and <|endoftext|>
CONTEXT = 77              # SD v1's prompt length

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photo of a CAT, sitting on the Mat!!!",                       # mixed case, punctuation runs
    "don't stop; we're here, they'll see it's mine, I'm sure you've he'd",   # contractions
    "café naïve résumé Zürich São Paulo ÀÉÎÕÜ ÑANDÚ",                # accents (precomposed)
    "cafe\u0301 and re\u0301sume\u0301",                             # accents (decomposed: NFC-normalised)
    "🐱🚀 emoji ❤️ 👩‍👩‍👧 party 🎉🎉",                               # multi-byte, ZWJ sequence
    "   extra    whitespace\t\tand\nnew\nlines\n\n  ",               # whitespace collapsed
    "",                                                               # empty text
    "1234567890 3.14159 $99.99 50% 2nd 1st 10x x² ½",                # digits are single tokens
    "C++ & Python: (a+b)*c = d/e; [x] {y} <z> @user #tag ~tilde `code` ^caret |pipe|",
    "日本語のテキスト 中文 한국어 русский текст ελληνικά",               # non-Latin scripts
    "ellipsis... dashes -- em\u2014dash en\u2013dash",
    "hello<|endoftext|>world",                                        # a special token typed in the text
    "a highly detailed oil painting of a castle on a hill, " * 8,    # over-long: truncated
]


# openai/CLIP's clip/bpe_simple_vocab_16e6.txt.gz (the same bytes ship in open-clip-torch 3.3.0): SD_FACTS.md
CLIP_MERGES_BYTES = 1_356_917
CLIP_MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def _clip_merges_gz() -> Path:
    """CLIP's merges file, as the package ships it in sd/assets."""
    path = Path(sd_tokenizer.__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    assert path.is_file(), f"{path} missing: the package should ship CLIP's merges file"
    return path


def _write_standard_clip_tokenizer_folder(gz_path: Path, folder: Path) -> Path:
    """The fixture's own vocab.json + merges.txt, built as openai/CLIP builds its vocabulary."""
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + 49408 - 2 * 256 - 2]           # header line, then the 48,894 merges CLIP uses
    # GPT-2's byte -> printable character table
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep + [256 + n for n in range(256 - len(keep))]
    byte_order = keep + [b for b in range(256) if b not in keep]
    table = dict(zip(byte_order, (chr(c) for c in chars)))
    tokens = list(table.values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def clip_gz() -> Path:
    return _clip_merges_gz()


@pytest.fixture(scope="module")
def clip_folder(clip_gz, tmp_path_factory) -> Path:
    return _write_standard_clip_tokenizer_folder(clip_gz, tmp_path_factory.mktemp("sd15") / "tokenizer")


@pytest.fixture(scope="module")
def hf_tokenizer(clip_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(clip_folder), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(clip_gz) -> CLIPTokenizer:
    return CLIPTokenizer(clip_gz)


def test_reference_tokenizer_pads_with_end_token_like_sd_v1(hf_tokenizer):
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.pad_token_id == EOT
    assert hf_tokenizer.bos_token_id == SOT


def test_vocabulary_has_clip_size_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert len(tokenizer.merges) == 48894
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (SOT, EOT, EOT)


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_encode_matches_transformers_clip_tokenizer(tokenizer, hf_tokenizer, prompt):
    assert tokenizer.encode(prompt) == hf_tokenizer(prompt).input_ids


def test_padded_batch_matches_transformers_clip_tokenizer(tokenizer, hf_tokenizer):
    expected = hf_tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True,
                            return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="longer than 77 tokens"):   # the over-long prompt
        ids = tokenizer(PROMPTS)
    assert ids.dtype == torch.long
    assert ids.shape == (len(PROMPTS), CONTEXT)
    assert torch.equal(ids, expected)
    assert ids[PROMPTS.index(""), 2:].eq(EOT).all()   # empty prompt: start, end, then end-token padding


# Known reference quirk (SD_FACTS, Tokenizer): CLIP cleans text with ftfy.fix_text and html.unescape
# (openai/CLIP basic_clean), which the project follows; transformers 5.x's fast CLIPTokenizer only
# applies NFC, whitespace collapsing and lowercasing. So HTML entities, curly apostrophes, Latin
# ligatures and full-width letters give different ids. The project's ids equal transformers' ids of
# the text cleaned by hand.
QUIRKS = [
    ("salt &amp; pepper", "salt & pepper"),
    ("&lt;3 my cat", "<3 my cat"),
    ("salt &amp;amp; pepper", "salt & pepper"),            # escaped twice
    ("<b>bold</b> &amp; more", "<b>bold</b> & more"),  # ftfy keeps entities next to tags; html.unescape not
    ("don\u2019t panic", "don't panic"),
    ("a \ufb01ne day", "a fine day"),
    ("\uff21\uff22\uff23 letters", "abc letters"),
]


@pytest.mark.parametrize("raw, cleaned", QUIRKS)
def test_html_and_unicode_cleanup_differs_from_transformers_as_documented(tokenizer, hf_tokenizer, raw, cleaned):
    assert tokenizer.encode(raw) == hf_tokenizer(cleaned).input_ids
    assert tokenizer.encode(raw) != hf_tokenizer(raw).input_ids


def test_tokenizer_folder_gives_same_ids_as_merges_file(tokenizer, clip_folder):
    from_folder = CLIPTokenizer(clip_folder)
    assert from_folder.vocab == tokenizer.vocab
    for prompt in PROMPTS:
        assert from_folder.encode(prompt) == tokenizer.encode(prompt)
    # a diffusers model folder (holding tokenizer/) and vocab.json itself lead to the same folder
    assert CLIPTokenizer(clip_folder.parent).encode(PROMPTS[1]) == tokenizer.encode(PROMPTS[1])
    assert CLIPTokenizer(clip_folder / "vocab.json").encode(PROMPTS[1]) == tokenizer.encode(PROMPTS[1])


def test_shipped_merges_file_is_openai_clips_file_byte_for_byte(clip_gz):
    data = clip_gz.read_bytes()
    assert len(data) == CLIP_MERGES_BYTES
    assert hashlib.sha256(data).hexdigest() == CLIP_MERGES_SHA256
    license_text = (clip_gz.parent / "bpe_simple_vocab_16e6.LICENSE.txt").read_text()
    assert "MIT License" in license_text and "Copyright (c) 2021 OpenAI" in license_text


def test_package_data_ships_the_merges_file_and_its_license():
    import tomllib
    from fnmatch import fnmatch
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sd"]
    for name in ("assets/bpe_simple_vocab_16e6.txt.gz", "assets/bpe_simple_vocab_16e6.LICENSE.txt"):
        assert any(fnmatch(name, p) for p in patterns), f"{name} is not in the package data {patterns}"


def test_no_path_reads_clips_merges_file_shipped_in_the_package(tokenizer, hf_tokenizer):
    default = CLIPTokenizer()
    assert default.vocab == tokenizer.vocab
    assert default.encode(PROMPTS[0]) == hf_tokenizer(PROMPTS[0]).input_ids


def test_missing_shipped_file_says_what_is_missing_and_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setattr(sd_tokenizer, "CLIP_MERGES_PATH", tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError, match=r"merges file .* is missing from this installation.*pip install -e \."):
        CLIPTokenizer()


@pytest.fixture(scope="module")
def fast_tokenizer_folder(hf_tokenizer, tmp_path_factory) -> Path:
    """tokenizer/ as today's transformers saves it: the fast tokenizer's tokenizer.json, no vocab.json/merges.txt."""
    folder = tmp_path_factory.mktemp("saved") / "tokenizer"
    hf_tokenizer.save_pretrained(str(folder))
    return folder


def test_today_saved_folder_holds_only_tokenizer_json(fast_tokenizer_folder):
    names = {p.name for p in fast_tokenizer_folder.iterdir()}
    assert "tokenizer.json" in names and not names & {"vocab.json", "merges.txt"}


def test_tokenizer_json_folder_gives_transformers_ids_on_every_prompt(fast_tokenizer_folder, hf_tokenizer, tokenizer):
    from_json = CLIPTokenizer(fast_tokenizer_folder)
    assert from_json.vocab == tokenizer.vocab and from_json.merges == tokenizer.merges
    for prompt in PROMPTS:
        assert from_json.encode(prompt) == hf_tokenizer(prompt).input_ids
    expected = hf_tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True,
                            return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        assert torch.equal(from_json(PROMPTS), expected)
    # the model folder above it, and the file itself, lead to the same tokenizer
    assert CLIPTokenizer(fast_tokenizer_folder.parent).encode(PROMPTS[1]) == hf_tokenizer(PROMPTS[1]).input_ids
    assert CLIPTokenizer(fast_tokenizer_folder / "tokenizer.json").encode(PROMPTS[3]) == hf_tokenizer(PROMPTS[3]).input_ids


def test_tokenizer_json_with_merges_as_strings_reads_the_same(fast_tokenizer_folder, tmp_path, tokenizer):
    data = json.loads((fast_tokenizer_folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]    # tokenizers < 0.20 wrote strings
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert CLIPTokenizer(tmp_path).merges == tokenizer.merges


def test_tokenizer_json_of_another_kind_is_refused_in_one_line(fast_tokenizer_folder, tmp_path):
    data = json.loads((fast_tokenizer_folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["end_of_word_suffix"] = None          # GPT-2's byte-level BPE has no end-of-word marker
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="is not a CLIP tokenizer: expected a BPE model whose words end with '</w>'"):
        CLIPTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a JSON file"):
        CLIPTokenizer(tmp_path)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer vocabulary at .*pass CLIPTokenizer\\(path\\)"):
        CLIPTokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"should hold vocab.json and merges.txt, or tokenizer.json; missing: \['vocab.json'"):
        CLIPTokenizer(tmp_path)
    not_merges = tmp_path / "notes.txt"
    not_merges.write_text("#version: 0.2\nthis line has four words\n")
    with pytest.raises(ValueError, match="line 2: expected a merge 'left right'"):
        CLIPTokenizer(not_merges)
    fake_gz = tmp_path / "fake.txt.gz"
    fake_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="is not a BPE merges file"):
        CLIPTokenizer(fake_gz)


def test_bad_inputs_give_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="expected a text"):
        tokenizer.encode(123)
    with pytest.raises(ValueError, match="expected a text or a list of texts"):
        tokenizer(["a cat", None])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([49408])


def test_decode_round_trips_plain_lowercase_text(tokenizer):
    for text in ["a photograph of an astronaut riding a horse", "a 🐱 and a café", "x"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    padded = tokenizer(["a red circle on a blue background"])[0]
    assert tokenizer.decode(padded) == "a red circle on a blue background"
    assert tokenizer.decode(tokenizer.encode("hi"), skip_special_tokens=False) == "<|startoftext|>hi <|endoftext|>"


def test_long_prompt_truncated_with_end_token_at_76_and_warning_naming_dropped_text(tokenizer, hf_tokenizer):
    cat, dog = hf_tokenizer("cat dog").input_ids[1:3]
    prompt = "cat " * 75 + "dog bird"          # 75 words fit between start and end, 2 are dropped
    with pytest.warns(UserWarning, match=r"prompt 0 is longer than 77 tokens.*dropped the end of it: 'dog bird'"):
        ids = tokenizer(prompt)[0]
    assert ids[76] == EOT
    assert ids[0] == SOT
    assert ids[1:76].eq(cat).all()
    assert dog not in ids.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # exactly 77 tokens: no warning
        ids = tokenizer("cat " * 75)[0]
    assert ids[76] == EOT and ids[75] == cat


def test_bpe_steps_by_hand():
    assert get_pairs(("c", "a", "t</w>")) == {("c", "a"), ("a", "t</w>")}
    assert merge_pair(("a", "a", "a", "b"), ("a", "a")) == ("aa", "a", "b")     # left to right, no overlap
    assert merge_pair(("a", "b", "x", "a", "b"), ("a", "b")) == ("ab", "x", "ab")  # every occurrence
    assert merge_pair(("a", "b", "a", "b</w>"), ("a", "b")) == ("ab", "a", "b</w>")  # b</w> is another symbol
    # the lowest rank is applied first, even when it comes later in the word
    ranks = {("b", "c</w>"): 0, ("a", "b"): 1, ("a", "bc</w>"): 2}
    assert bpe(("a", "b", "c</w>"), ranks) == ("abc</w>",)
    assert bpe(("a", "b", "c</w>"), {("a", "b"): 0, ("b", "c</w>"): 1}) == ("ab", "c</w>")


CORPUS = ["hug hug hug pug", "pun BUN"]


def test_learn_bpe_merges_finds_hand_derived_merges():
    # words: hug x3, pug, pun, bun -> h u g</w>, p u g</w>, p u n</w>, b u n</w>
    # pairs: (u,g</w>)=4, (h,u)=3, (p,u)=2, (u,n</w>)=2, (b,u)=1 -> merge u+g</w>
    # then:  (h,ug</w>)=3, (u,n</w>)=2, others 1                  -> merge h+ug</w>
    # then:  (u,n</w>)=2, others 1                                -> merge u+n</w>
    # then:  (p,ug</w>), (p,un</w>), (b,un</w>) all 1: ties go to the pair that sorts first -> b+un</w>
    merges = learn_bpe_merges(CORPUS, 4)
    assert merges == [("u", "g</w>"), ("h", "ug</w>"), ("u", "n</w>"), ("b", "un</w>")]
    # then:  (p,ug</w>), (p,un</w>) tie -> p+ug</w>, then p+un</w>; every word is one token: learning stops
    assert learn_bpe_merges(CORPUS, 100) == merges + [("p", "ug</w>"), ("p", "un</w>")]


def test_learned_tokenizer_vocabulary_and_compression(tmp_path):
    merges = learn_bpe_merges(CORPUS, 3)
    small = CLIPTokenizer.from_merges(merges, max_length=8)
    # 256 bytes + 256 bytes with </w> + 3 merges + 2 specials; 'b' is byte 98, 65th printable byte from '!'
    assert small.vocab_size == 517
    assert (small.bos_id, small.eos_id, small.pad_id) == (515, 516, 516)
    assert small.encode("Hug bun") == [515, 513, 98 - 33, 514, 516]
    text = " ".join(CORPUS)
    assert len(small.encode(text)) - 2 < len(text.replace(" ", "").encode("utf-8"))
    assert small("hug")[0].tolist() == [515, 513, 516, 516, 516, 516, 516, 516]
    # saved as a tokenizer/ folder: loads back with the same ids, also in transformers
    small.save(tmp_path / "tokenizer")
    loaded = CLIPTokenizer(tmp_path / "tokenizer", max_length=8)
    assert loaded.vocab == small.vocab and loaded.merges == small.merges
    assert loaded.encode(text) == small.encode(text)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"), local_files_only=True)
    assert hf(text).input_ids == small.encode(text)
