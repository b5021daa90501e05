"""Textual inversion: the files diffusers reads give the text-encoder outputs diffusers gives; learning a new word."""
import pytest
import torch
from safetensors.torch import save_file

import sd
from sd.adapters.textual_inversion import (load_textual_inversion, read_embedding_file, textual_inversion_optimizer,
                                           textual_inversion_step)
from tests.reference import reference_and_ours, rel_err

TOL = 1e-5
WIDTH = sd.CLIPConfig.tiny().width


@pytest.fixture(scope="module")
def vocabulary_folder(tmp_path_factory):
    """CLIP's real vocabulary (from the open-clip-torch wheel), written as a tokenizer/ folder transformers reads."""
    return sd.CLIPTokenizer().save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def pipes(vocabulary_folder):
    """A diffusers pipeline and ours, with the same tiny random models and CLIP's real vocabulary."""
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    ref, ours = reference_and_ours()
    reference = StableDiffusionPipeline(
        vae=ref["vae"], text_encoder=ref["clip"], unet=ref["unet"], scheduler=DDIMScheduler(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(vocabulary_folder), local_files_only=True,
                                                            model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return reference, sd.StableDiffusion(**ours, tokenizer=sd.CLIPTokenizer(vocabulary_folder))


def diffusers_text(reference, prompt):
    with torch.no_grad():
        return reference.encode_prompt(prompt, "cpu", 1, False)[0]


def vectors(n, width=WIDTH, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_diffusers(path, token, v):
    save_file({token: v}, str(path))
    return path


def write_a1111_pt(path, token, v):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": token, "step": 3000,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, path)
    return path


@pytest.mark.parametrize("writer, n", [(write_diffusers, 1), (write_diffusers, 3), (write_a1111_pt, 2)],
                         ids=["diffusers_1_vector", "diffusers_3_vectors", "a1111_pt_2_vectors"])
def test_embedding_gives_diffusers_text_encoder_outputs(pipes, tmp_path, writer, n):
    reference, pipe = pipes
    suffix = ".pt" if writer is write_a1111_pt else ".safetensors"
    path = writer(tmp_path / f"learned{suffix}", "<cat-toy>", vectors(n))
    prompt = "a <cat-toy> on a table, next to <cat-toy>"
    before = pipe.encode_prompt([prompt])

    reference.load_textual_inversion(str(path))
    added = load_textual_inversion(pipe, path)

    assert added == ["<cat-toy>"] + [f"<cat-toy>_{i}" for i in range(1, n)]
    got, expected = pipe.encode_prompt([prompt]), diffusers_text(reference, prompt)
    assert rel_err(got, before) > 1e-2
    assert rel_err(got, expected) < TOL


def test_prompt_ids_hold_all_vectors_of_the_word(pipes, tmp_path):
    _, pipe = pipes
    pipe.load_textual_inversion(write_diffusers(tmp_path / "e.safetensors", "<t>", vectors(3)))
    ids = pipe.tokenizer.encode("a <t>_1 and <T>")              # the prompt is lowercased as CLIP does
    first = pipe.tokenizer.vocab["<t>"]
    assert ids[1:-1] == [pipe.tokenizer.encode("a")[1], first + 1, pipe.tokenizer.encode("and")[1],
                         first, first + 1, first + 2]
    rows = pipe.clip.embedding.token_embedding.weight
    assert torch.equal(rows[first:first + 3], vectors(3))


def test_a1111_safetensors_word_is_the_file_name_unless_a_token_is_given(pipes, tmp_path):
    _, pipe = pipes
    save_file({"emb_params": vectors(2)}, str(tmp_path / "bad-hands.safetensors"))
    assert read_embedding_file(tmp_path / "bad-hands.safetensors")[0] == "bad-hands"
    assert load_textual_inversion(pipe, tmp_path / "bad-hands.safetensors", token="<bh>") == ["<bh>", "<bh>_1"]


def test_unknown_word_is_just_text(pipes):
    _, pipe = pipes
    ids = pipe.tokenizer.encode("a <cat-toy>")
    assert len(ids) > 4 and max(ids) < 49408                    # BPE pieces of '<', 'cat', '-', 'toy', '>'


@pytest.mark.parametrize("tensors, message", [
    ({"<t>": torch.zeros(1, 768)}, "768 wide, this text encoder is 128 wide"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
    ({"<|endoftext|>": torch.zeros(1, WIDTH)}, "already a vocabulary entry"),
    ({"<t>": torch.zeros(2, 3, WIDTH)}, r"\(D,\) or \(n, D\)"),
])
def test_bad_embedding_file_gets_one_line(pipes, tmp_path, tensors, message):
    _, pipe = pipes
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    rows = pipe.clip.embedding.token_embedding.num_embeddings
    with pytest.raises(ValueError, match=message) as e:
        load_textual_inversion(pipe, tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)
    assert pipe.clip.embedding.token_embedding.num_embeddings == rows


def test_learning_a_word_moves_only_its_row():
    torch.manual_seed(0)
    _, ours = reference_and_ours()
    pipe = sd.StableDiffusion(**ours, tokenizer=sd.CLIPTokenizer(sd.io.checkpoint.DEFAULT_MODEL.parent /
                                                                  "default_model_tokenizer"))
    [token] = load_textual_inversion(pipe, write_diffusers_tmp(vectors(1)))
    new_id = pipe.tokenizer.vocab[token]
    table = pipe.clip.embedding.token_embedding.weight.detach().clone()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    optimizer = textual_inversion_optimizer(pipe, lr=1e-2)
    latents, generator = torch.randn(2, 4, 8, 8), torch.Generator().manual_seed(0)
    losses = [textual_inversion_step(pipe, latents, [f"a photo of {token}"] * 2, [new_id], optimizer, generator)
              for _ in range(3)]
    after = pipe.clip.embedding.token_embedding.weight.detach()
    assert all(l > 0 for l in losses)
    assert not torch.equal(after[new_id], table[new_id])
    others = torch.arange(after.shape[0]) != new_id
    assert torch.equal(after[others], table[others])
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())


def write_diffusers_tmp(v):
    import tempfile
    from pathlib import Path
    return write_diffusers(Path(tempfile.mkdtemp()) / "learned_embeds.safetensors", "<new-word>", v)
