"""A diffusers folder as today's diffusers/transformers save it (tokenizer/ holds only tokenizer.json) loads and draws.

The pipeline is built offline from config dicts (tiny widths, random weights), with transformers' CLIP tokenizer
(the fast one, on the `tokenizers` library) made from CLIP's vocabulary, and saved with diffusers' save_pretrained:
exactly what a user holds after fine-tuning with diffusers.
"""
import pytest
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline

import sd
from tests.reference import reference_and_ours, rel_err
from tests.test_tokenizer import PROMPTS, _clip_merges_gz, _write_standard_clip_tokenizer_folder

SIDE = 64            # pixels: the tiny VAE shrinks 8x, the tiny UNet halves the latent 3 times -> a multiple of 64
STEPS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder written by StableDiffusionPipeline.save_pretrained, the diffusers pipeline it came from)."""
    ref, _ = reference_and_ours(seed=21)
    vocabulary = _write_standard_clip_tokenizer_folder(_clip_merges_gz(), tmp_path_factory.mktemp("v") / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocabulary), local_files_only=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["clip"], tokenizer=tokenizer, unet=ref["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("saved") / "my-fine-tuned-sd"
    pipe.save_pretrained(folder)
    return folder, pipe


def test_todays_save_pretrained_writes_tokenizer_json_and_no_vocab_or_merges(saved):
    folder, _ = saved
    names = {p.name for p in (folder / "tokenizer").iterdir()}
    assert "tokenizer.json" in names
    assert not names & {"vocab.json", "merges.txt"}, names


def test_folder_with_only_tokenizer_json_loads_with_transformers_tokens(saved):
    folder, reference = saved
    pipe = sd.load_checkpoint(folder, device="cpu")
    for prompt in PROMPTS:
        assert pipe.tokenizer.encode(prompt) == reference.tokenizer(prompt).input_ids, prompt
    expected = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        assert torch.equal(pipe.tokenizer(PROMPTS), expected)
    # the text encoder read from the same folder gives diffusers' prompt embedding
    with torch.no_grad():
        theirs = reference.text_encoder(expected[:2])[0]
        ours = pipe.encode_prompt(PROMPTS[:2])
    assert rel_err(ours, theirs) < 1e-5


def test_folder_with_only_tokenizer_json_generates(saved):
    folder, _ = saved
    pipe = sd.load_checkpoint(folder, device="cpu")
    images = pipe.generate("a photograph of an astronaut riding a horse", height=SIDE, width=SIDE,
                           num_inference_steps=STEPS, seed=0, progress=False, output_type="pt")
    assert images.shape == (1, 3, SIDE, SIDE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
