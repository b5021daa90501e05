"""The stand-in for SD v1.5's file (tools/make_full_layout_checkpoint.py) has SD v1.5's very keys, and loads."""
from safetensors import safe_open

import sd
from tools.make_full_layout_checkpoint import main

# Key counts of v1-5-pruned-emaonly.safetensors per model (shared/SD_FACTS.md, read off the public file).
SD15_KEYS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.text_model.": 197}


def test_the_stand_in_has_sd15s_keys_and_loads_with_the_real_tokenizer(tmp_path):
    path = tmp_path / "sd15_layout.safetensors"
    assert main([str(path)]) == 0
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert {prefix: sum(k.startswith(prefix) for k in keys) for prefix in SD15_KEYS} == SD15_KEYS
    assert len(keys) == sum(SD15_KEYS.values())
    pipe = sd.load_checkpoint(path, device="cpu")
    assert pipe.clip.config.vocab_size == 49408 and pipe.native_size == 512
    image = pipe.generate("an astronaut riding a horse", height=64, width=64, num_inference_steps=2, seed=0,
                          progress=False, output_type="pt")
    assert image.shape == (1, 3, 64, 64) and image.isfinite().all()
