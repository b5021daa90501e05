"""Hub ids: loaded from a local Hub-style cache; offline without a cache, one clear message at once."""
import time

import pytest
import torch

import sd
from tests.reference import reference_and_ours, rel_err


def _write_hub_cache(cache, repo_id, ref, tokenizer):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    ref["unet"].save_pretrained(snap / "unet")
    ref["vae"].save_pretrained(snap / "vae")
    ref["clip"].save_pretrained(snap / "text_encoder")
    tokenizer.save(snap / "tokenizer")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_cache_offline(offline_hub):
    ref, ours = reference_and_ours(seed=9)
    _write_hub_cache(offline_hub, "someone/tiny-sd", ref, sd.CLIPTokenizer())
    pipe = sd.load_checkpoint("someone/tiny-sd", device="cpu")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    with torch.no_grad():
        assert rel_err(pipe.unet(x, ctx, 10), ref["unet"](x, 10, encoder_hidden_states=ctx).sample) < 1e-5
    assert pipe.tokenizer("a cat").shape == (1, 77)


def test_hub_id_offline_without_cache_fails_at_once_with_what_to_do(offline_hub):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not get 'stable-diffusion-v1-5/stable-diffusion-v1-5'.*"
                                         r"Place a checkpoint by hand.*sd\.load_checkpoint\(path\)") as e:
        sd.load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    assert time.perf_counter() - start < 10
    assert len(str(e.value).splitlines()) == 1


def test_paths_are_not_mistaken_for_hub_ids(tmp_path):
    from sd.io.hub import looks_like_repo_id
    assert looks_like_repo_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not looks_like_repo_id("models/v1-5.safetensors")
    assert not looks_like_repo_id(str(tmp_path))
    assert not looks_like_repo_id("model.ckpt")
