"""LoRA: the layer, training it, and loading diffusers/PEFT and kohya files with the numbers diffusers gives."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sd
from sd.adapters.lora import LoRALayer, add_lora, fuse_lora, lora_layers, set_lora_scale, unload_lora
from sd.adapters.lora_files import kohya_to_module_path, load_lora_weights, read_lora_file, save_lora_weights
from tests.reference import reference_and_ours, rel_err

TOL = 1e-5          # relative to the output scale, as the model parity tests
RANK, ALPHA = 4, 2.5  # alpha != rank, so a forgotten alpha / rank factor shows


# --- making LoRA files from a diffusers UNet / transformers CLIP, in the layouts people download ---------------
def adapted_layers(model: nn.Module, endings: tuple[str, ...]) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(endings) and isinstance(m, (nn.Linear, nn.Conv2d))}


def random_lora(layers: dict[str, nn.Module], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random A and B (B non-zero: a fresh LoRA's B = 0 would hide every mistake) for each layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in layers.items():
        if isinstance(m, nn.Linear):
            down, up = torch.randn(RANK, m.in_features, generator=g), torch.randn(m.out_features, RANK, generator=g)
        else:
            down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=g)
        out[name] = (down * 0.1, up * 0.1)
    return out


UNET_ENDINGS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2")
TEXT_ENDINGS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def write_peft_file(path, unet_lora, text_lora):
    """diffusers' own layout: `unet.<module>.lora_A.weight`, alpha in PEFT's config in the metadata."""
    tensors = {}
    for prefix, lora in (("unet", unet_lora), ("text_encoder", text_lora)):
        for name, (down, up) in lora.items():
            tensors[f"{prefix}.{name}.lora_A.weight"] = down
            tensors[f"{prefix}.{name}.lora_B.weight"] = up
    config = {}
    for prefix, lora in (("unet", unet_lora), ("text_encoder", text_lora)):
        config.update({f"{prefix}.r": RANK, f"{prefix}.lora_alpha": ALPHA, f"{prefix}.target_modules": sorted(lora)})
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def write_kohya_file(path, unet_lora, text_lora):
    """kohya's layout: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    tensors = {}
    for prefix, lora in (("lora_unet_", unet_lora), ("lora_te_text_model_", text_lora)):
        for name, (down, up) in lora.items():
            stem = prefix + name.replace(".", "_")
            tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                            f"{stem}.alpha": torch.tensor(ALPHA)})
    save_file(tensors, str(path))
    return path


def diffusers_pipeline(ref):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    import transformers
    return StableDiffusionPipeline(
        vae=ref["vae"], text_encoder=ref["clip"], unet=ref["unet"], scheduler=DDIMScheduler(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(sd.io.checkpoint.DEFAULT_MODEL.parent /
                                                                 "default_model_tokenizer"), local_files_only=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def outputs(ref_or_ours, which):
    """UNet and text-encoder outputs on fixed inputs, for diffusers' models ("ref") or ours."""
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g), 500
    tokens = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        if which == "ref":
            return (ref_or_ours["unet"](x, t, encoder_hidden_states=ctx).sample,
                    ref_or_ours["clip"](input_ids=tokens).last_hidden_state)
        return ref_or_ours.unet(x, ctx, t), ref_or_ours.clip(tokens)


@pytest.fixture()
def models():
    ref, ours = reference_and_ours()
    return ref, sd.StableDiffusion(**ours)


@pytest.mark.parametrize("writer", [write_peft_file, write_kohya_file], ids=["diffusers_peft", "kohya"])
def test_lora_file_gives_diffusers_outputs(models, tmp_path, writer):
    ref, pipe = models
    unet_lora = random_lora(adapted_layers(ref["unet"], UNET_ENDINGS), seed=3)
    text_lora = random_lora(adapted_layers(ref["clip"], TEXT_ENDINGS), seed=4)
    path = writer(tmp_path / "lora.safetensors", unet_lora, text_lora)
    before = outputs(pipe, "ours")

    diffusers_pipeline(ref).load_lora_weights(str(path))
    counts = load_lora_weights(pipe, path)

    assert counts == {"unet": len(unet_lora), "text_encoder": len(text_lora)}
    (unet_ref, text_ref), (unet_ours, text_ours) = outputs(ref, "ref"), outputs(pipe, "ours")
    assert rel_err(unet_ours, before[0]) > 1e-2 and rel_err(text_ours, before[1]) > 1e-2   # the LoRA did something
    assert rel_err(unet_ours, unet_ref) < TOL
    assert rel_err(text_ours, text_ref) < TOL
