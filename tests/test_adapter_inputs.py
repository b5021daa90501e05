"""Adapters refuse what would damage the model (non-finite numbers, a scale that is not a number, a word that
would shadow an existing one) in one line, before changing anything: after a refused call the pipeline draws the
same image for a fixed seed, and its weights, vocabulary and embedding table are exactly as they were."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import sd
from sd.adapters.lora import LoRALayer, fuse_lora, lora_layers, set_lora_scale
from sd.adapters.lora_files import load_lora_weights
from sd.adapters.textual_inversion import add_token_rows, load_textual_inversion

PROMPT = "a red circle on a blue background"      # holds "red": a word that shadows it changes this image
FAST = dict(num_inference_steps=2, progress=False, output_type="pt")

# Layers of the shipped small model (sd.load_checkpoint() with no argument), in diffusers' names as files spell them.
UNET_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"     # Linear 64 -> 96 (context -> keys)
UNET_IN, UNET_OUT = 64, 96
TEXT_LAYER = "text_model.encoder.layers.0.self_attn.q_proj"                   # Linear 64 -> 64
TEXT_WIDTH = 64
RANK = 2


@pytest.fixture()
def pipe():
    return sd.load_checkpoint(device="cpu")


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def snapshot(pipe) -> dict:
    """What a refused call must leave as it was: an image for a fixed seed, every weight, the vocabulary."""
    return {"image": pipe.generate(PROMPT, seed=0, **FAST),
            "weights": {name: {k: v.clone() for k, v in model.state_dict().items()}
                        for name, model in pipe.models().items()},
            "vocab_size": len(pipe.tokenizer.vocab),
            "added_tokens": dict(pipe.tokenizer.added_tokens),
            "table_rows": pipe.clip.embedding.token_embedding.num_embeddings,
            "tokens": pipe.tokenizer.encode(PROMPT)}


def assert_unchanged(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert torch.equal(after["image"], before["image"])
    for name, weights in before["weights"].items():
        assert list(after["weights"][name]) == list(weights), f"{name}: modules were added or removed"
        assert all(torch.equal(after["weights"][name][k], v) for k, v in weights.items()), f"{name} weights changed"
    for key in ("vocab_size", "added_tokens", "table_rows", "tokens"):
        assert after[key] == before[key], key


def refused(pipe, call, error, words) -> None:
    """`call()` raises `error` with `words` in one line, and leaves the pipeline as it was."""
    before = snapshot(pipe)
    with pytest.raises(error) as e:
        call()
    assert words in one_line(e.value)
    assert_unchanged(pipe, before)


# --- LoRA files in the three layouts, with one bad number --------------------------------------------------------
def matrices(seed=0, unet=True):
    g = torch.Generator().manual_seed(seed)
    width_in, width_out = (UNET_IN, UNET_OUT) if unet else (TEXT_WIDTH, TEXT_WIDTH)
    return 0.1 * torch.randn(RANK, width_in, generator=g), 0.1 * torch.randn(width_out, RANK, generator=g)


def peft_file(path, down, up, text_down=None, text_up=None, alpha=2.0):
    """diffusers/PEFT: `unet.<module>.lora_A.weight`, alpha in the metadata as PEFT's lora_alpha."""
    tensors = {f"unet.{UNET_LAYER}.lora_A.weight": down, f"unet.{UNET_LAYER}.lora_B.weight": up}
    if text_down is not None:
        tensors.update({f"text_encoder.{TEXT_LAYER}.lora_A.weight": text_down,
                        f"text_encoder.{TEXT_LAYER}.lora_B.weight": text_up})
    metadata = {"unet.r": RANK, "unet.lora_alpha": alpha, "text_encoder.r": RANK, "text_encoder.lora_alpha": 2.0}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return path


def kohya_file(path, down, up, alpha=torch.tensor(2.0)):
    """kohya (sd-scripts; what A1111 and Civitai files hold): `lora_unet_<module with _>.lora_down.weight`."""
    stem = "lora_unet_" + UNET_LAYER.replace(".", "_")
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}, str(path))
    return path


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def test_a_good_lora_file_changes_the_image_so_the_unchanged_check_can_fail(pipe, tmp_path):
    down, up = matrices()
    before = snapshot(pipe)
    load_lora_weights(pipe, kohya_file(tmp_path / "good.safetensors", down, 10 * up))
    assert not torch.equal(pipe.generate(PROMPT, seed=0, **FAST), before["image"])


@pytest.mark.parametrize("layout, bad", [
    ("peft", "up"), ("peft", "down"), ("kohya", "up"), ("kohya", "down"), ("peft", "text_up")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_lora_file_with_a_non_finite_number_is_refused_naming_the_key(pipe, tmp_path, layout, bad, value):
    down, up = matrices()
    text_down, text_up = matrices(1, unet=False)
    if bad == "up":
        up = with_value(up, value)
    elif bad == "down":
        down = with_value(down, value)
    else:
        text_up = with_value(text_up, value)
    if layout == "peft":
        path = peft_file(tmp_path / "bad.safetensors", down, up, text_down, text_up)
        key = {"up": f"unet.{UNET_LAYER}.lora_B.weight", "down": f"unet.{UNET_LAYER}.lora_A.weight",
               "text_up": f"text_encoder.{TEXT_LAYER}.lora_B.weight"}[bad]
    else:
        path = kohya_file(tmp_path / "bad.safetensors", down, up)
        key = "lora_unet_" + UNET_LAYER.replace(".", "_") + (".lora_up.weight" if bad == "up" else ".lora_down.weight")
    refused(pipe, lambda: load_lora_weights(pipe, path), ValueError,
            f"bad.safetensors, key '{key}' holds NaN or infinite values; refused before changing the model")


def test_a_kohya_alpha_that_is_nan_is_refused(pipe, tmp_path):
    path = kohya_file(tmp_path / "bad.safetensors", *matrices(), alpha=torch.tensor(math.nan))
    refused(pipe, lambda: pipe.load_lora_weights(path), ValueError, "alpha must be a finite number, got nan")


def test_a_peft_lora_alpha_that_is_infinite_is_refused(pipe, tmp_path):
    path = peft_file(tmp_path / "bad.safetensors", *matrices(), alpha=math.inf)
    refused(pipe, lambda: pipe.load_lora_weights(path), ValueError,
            "bad.safetensors: metadata unet.lora_alpha: alpha must be a finite number, got inf")


def test_an_integer_lora_matrix_is_refused(pipe, tmp_path):
    down, up = matrices()
    path = kohya_file(tmp_path / "bad.safetensors", down, (up * 100).to(torch.int32))
    refused(pipe, lambda: pipe.load_lora_weights(path), ValueError,
            "a LoRA matrix must be a floating-point tensor, got torch.int32")


@pytest.mark.parametrize("scale, error, words", [
    (math.nan, ValueError, "scale must be a finite number, got nan"),
    (math.inf, ValueError, "scale must be a finite number, got inf"),
    ("0.5", TypeError, "scale must be a number, got str '0.5'"),
    (True, TypeError, "scale must be a number, got bool True"),
    (None, TypeError, "scale must be a number, got NoneType None"),
])
def test_load_lora_weights_scale_must_be_a_finite_real_number(pipe, tmp_path, scale, error, words):
    path = kohya_file(tmp_path / "good.safetensors", *matrices())
    refused(pipe, lambda: pipe.load_lora_weights(path, scale=scale), error, words)


@pytest.mark.parametrize("scale, error, words", [
    (math.nan, ValueError, "scale must be a finite number, got nan"),
    ("1", TypeError, "scale must be a number, got str '1'"),
])
def test_set_lora_scale_refuses_a_bad_scale_and_keeps_the_old_one(pipe, tmp_path, scale, error, words):
    down, up = matrices()
    pipe.load_lora_weights(kohya_file(tmp_path / "good.safetensors", down, 10 * up), scale=0.5)
    refused(pipe, lambda: set_lora_scale(pipe.unet, scale), error, words)
    assert [layer.scale for layer in lora_layers(pipe.unet).values()] == [0.5]


def test_a_lora_layer_refuses_a_string_scale():
    with pytest.raises(TypeError) as e:
        LoRALayer(torch.nn.Linear(4, 4), rank=2, scale="2")
    assert "scale must be a number, got str '2'" in one_line(e.value)


def test_fusing_a_lora_with_a_non_finite_update_is_refused_and_fuses_nothing(pipe, tmp_path):
    down, up = matrices()
    text_down, text_up = matrices(1, unet=False)
    pipe.load_lora_weights(peft_file(tmp_path / "good.safetensors", down, 10 * up, text_down, text_up))
    [(name, layer)] = lora_layers(pipe.unet).items()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = math.inf             # a LoRA whose training diverged
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError) as e:
        fuse_lora(pipe.unet)
    assert f"cannot fuse the LoRA of {name}: the fused weight would hold NaN or infinite values" in one_line(e.value)
    after = pipe.unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_refused_lora_file_after_a_good_one_keeps_the_good_one(pipe, tmp_path):
    down, up = matrices()
    pipe.load_lora_weights(kohya_file(tmp_path / "good.safetensors", down, 10 * up))
    bad = peft_file(tmp_path / "bad.safetensors", down, with_value(up, math.nan))
    refused(pipe, lambda: pipe.load_lora_weights(bad), ValueError, "holds NaN or infinite values")
    assert len(lora_layers(pipe.unet)) == 1 and not isinstance(next(iter(lora_layers(pipe.unet).values())).base,
                                                               LoRALayer)


# --- textual-inversion files and words ---------------------------------------------------------------------------
def vectors(n=1, seed=0):
    return torch.randn(n, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


def diffusers_embedding(path, word, v):
    save_file({word: v}, str(path))
    return path


def a1111_pt(path, word, v):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": word, "step": 100}, path)
    return path


def a1111_safetensors(path, word, v):
    save_file({"emb_params": v}, str(path.with_name(f"{word}.safetensors")))
    return path.with_name(f"{word}.safetensors")


def test_a_word_that_shadows_red_would_change_the_image_so_the_refusal_matters(pipe):
    """The damage the check prevents, done by hand: 'red' given a new vector changes every prompt with 'red'."""
    before = pipe.generate(PROMPT, seed=0, **FAST)
    ids = pipe.tokenizer.add_token("red")                       # the literal "red" is not in the vocabulary ...
    add_token_rows(pipe.clip, ids, vectors(1))                   # ... but "red</w>" is: prompts now read the new row
    assert (pipe.generate(PROMPT, seed=0, **FAST) - before).abs().max() > 0.05


@pytest.mark.parametrize("writer, suffix", [(diffusers_embedding, ".safetensors"), (a1111_pt, ".pt"),
                                            (a1111_safetensors, ".safetensors")],
                         ids=["diffusers", "a1111_pt", "a1111_safetensors"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_an_embedding_with_a_non_finite_number_is_refused(pipe, tmp_path, writer, suffix, value):
    path = writer(tmp_path / f"learned{suffix}", "<new-shape>", with_value(vectors(2), value))
    refused(pipe, lambda: pipe.load_textual_inversion(path), ValueError,
            f"{path.name}: the vectors of '<new-shape>' hold NaN or infinite values; refused before changing the model")


@pytest.mark.parametrize("word, shadowed, entry", [
    ("red", "red", "red</w>"), ("Red", "red", "red</w>"), ("RED", "red", "red</w>"),
    ("circle", "circle", "circle</w>"), ("<|endoftext|>", None, None)])
def test_a_word_the_tokenizer_already_reads_is_refused_with_the_word_it_would_shadow(pipe, tmp_path, word,
                                                                                      shadowed, entry):
    path = diffusers_embedding(tmp_path / "learned.safetensors", "<new-shape>", vectors())
    words = (f"token {word!r} would shadow the existing word {shadowed!r} (the tokenizer reads it as the "
             f"vocabulary entry {entry!r})" if shadowed else f"token {word!r} is already a vocabulary entry")
    refused(pipe, lambda: pipe.load_textual_inversion(path, token=word), ValueError, words)


def test_a_file_whose_own_word_is_red_is_refused(pipe, tmp_path):
    path = diffusers_embedding(tmp_path / "learned.safetensors", "red", vectors())
    refused(pipe, lambda: pipe.load_textual_inversion(path), ValueError, "would shadow the existing word 'red'")


def test_a_word_already_added_is_refused_in_any_case(pipe, tmp_path):
    pipe.load_textual_inversion(diffusers_embedding(tmp_path / "a.safetensors", "<new-shape>", vectors(2)))
    path = diffusers_embedding(tmp_path / "b.safetensors", "<New-Shape>", vectors(1, seed=1))
    refused(pipe, lambda: pipe.load_textual_inversion(path), ValueError,
            "token '<New-Shape>' is already taken by an earlier textual inversion")


def test_a_multi_vector_word_whose_second_token_is_taken_changes_nothing(pipe, tmp_path):
    pipe.load_textual_inversion(diffusers_embedding(tmp_path / "a.safetensors", "<s>_1", vectors()))
    path = diffusers_embedding(tmp_path / "b.safetensors", "<s>", vectors(3))    # would add <s>, <s>_1, <s>_2
    refused(pipe, lambda: pipe.load_textual_inversion(path), ValueError, "token '<s>_1' is already taken")


@pytest.mark.parametrize("token, error, words", [
    (5, TypeError, "token must be a string (the new word, e.g. '<my-shape>') or None, got int 5"),
    ("", ValueError, "token must be a word such as '<my-shape>', got ''"),
    ("<my shape>", ValueError, "token must be one word without spaces"),
])
def test_a_token_argument_that_is_not_one_word_is_refused(pipe, tmp_path, token, error, words):
    path = diffusers_embedding(tmp_path / "learned.safetensors", "<new-shape>", vectors())
    refused(pipe, lambda: pipe.load_textual_inversion(path, token=token), error, words)


def test_integer_embedding_vectors_are_refused(pipe, tmp_path):
    path = diffusers_embedding(tmp_path / "learned.safetensors", "<new-shape>", torch.ones(1, TEXT_WIDTH,
                                                                                          dtype=torch.int64))
    refused(pipe, lambda: pipe.load_textual_inversion(path), ValueError,
            "the vectors of '<new-shape>' must be floating-point numbers, got torch.int64")


def test_a_good_embedding_still_loads_after_refused_ones(pipe, tmp_path):
    bad = diffusers_embedding(tmp_path / "bad.safetensors", "<new-shape>", with_value(vectors(), math.nan))
    with pytest.raises(ValueError):
        pipe.load_textual_inversion(bad)
    good = diffusers_embedding(tmp_path / "good.safetensors", "<new-shape>", vectors())
    assert load_textual_inversion(pipe, good) == ["<new-shape>"]
    assert pipe.tokenizer.encode("<new-shape>")[1:-1] == [pipe.tokenizer.vocab["<new-shape>"]]


@pytest.mark.parametrize("rank, alpha, error, words", [
    (0, None, ValueError, "LoRA rank must be an integer in [1, inf], got 0"),
    ("4", None, TypeError, "LoRA rank must be an integer, got str '4'"),
    (4, math.nan, ValueError, "LoRA alpha must be a finite number, got nan"),
])
def test_add_lora_refuses_a_bad_rank_or_alpha_before_freezing_the_model(pipe, rank, alpha, error, words):
    from sd.adapters.lora import add_lora
    pipe.unet.requires_grad_(True)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(error) as e:
        add_lora(pipe.unet, rank=rank, alpha=alpha)
    assert words in one_line(e.value)
    assert all(p.requires_grad for p in pipe.unet.parameters())                 # not frozen
    assert list(pipe.unet.state_dict()) == list(weights)                         # no layer wrapped


@pytest.mark.parametrize("load, what", [("load_lora_weights", "LoRA file"),
                                        ("load_textual_inversion", "textual-inversion file")])
def test_an_adapter_path_that_is_not_a_file_is_named(pipe, tmp_path, load, what):
    refused(pipe, lambda: getattr(pipe, load)(None), TypeError,
            f"path must be the path of a {what} (a str or pathlib.Path), got NoneType None")
    refused(pipe, lambda: getattr(pipe, load)(tmp_path / "absent.safetensors"), FileNotFoundError,
            f"no {what} at {tmp_path / 'absent.safetensors'}")
