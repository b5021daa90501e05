"""LoRA: the layer, training it, and loading diffusers/PEFT and kohya files with the numbers diffusers gives."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sd
from sd.adapters.lora import LoRALayer, add_lora, fuse_lora, lora_layers, set_lora_scale, unload_lora
from sd.adapters.lora_files import kohya_to_module_path, load_lora_weights, read_lora_file
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
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), 500
    tokens = torch.randint(0, 49408, (1, 77), generator=g)
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


def test_lora_scale_matches_diffusers_adapter_weight(models, tmp_path):
    ref, pipe = models
    unet_lora = random_lora(adapted_layers(ref["unet"], UNET_ENDINGS), seed=5)
    path = write_kohya_file(tmp_path / "lora.safetensors", unet_lora, {})
    reference = diffusers_pipeline(ref)
    reference.load_lora_weights(str(path), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.4])
    load_lora_weights(pipe, path, scale=0.4)
    assert rel_err(outputs(pipe, "ours")[0], outputs(ref, "ref")[0]) < TOL


# --- the layer itself -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(6, 5, 3, padding=1)], ids=["linear", "conv3x3"])
def test_lora_layer_adds_scaled_low_rank_update(base):
    torch.manual_seed(0)
    layer = LoRALayer(base, rank=2, alpha=3.0, scale=0.5)
    nn.init.normal_(layer.lora_B.weight)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if isinstance(base, nn.Linear):
        x = torch.randn(4, 6)
        expected = base(x) + 0.5 * (3.0 / 2) * (x @ a.T @ b.T)
    else:
        x = torch.randn(1, 6, 7, 7)
        low = torch.nn.functional.conv2d(x, a, padding=1)                       # (1, 2, 7, 7)
        expected = base(x) + 0.5 * (3.0 / 2) * torch.einsum("or,brhw->bohw", b[:, :, 0, 0], low)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_new_lora_changes_nothing_and_trains_only_its_matrices():
    torch.manual_seed(0)
    unet = sd.DiffusionUNET(sd.UNetConfig.tiny()).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    before = unet(x, ctx, 10).detach()
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    params = add_lora(unet, rank=2)
    adapted = lora_layers(unet)
    # q, k, v, out of attn1 and attn2 in 16 transformer blocks: 2 per down level x 3, 1 in the mid, 3 per up level x 3
    assert len(adapted) == 4 * 2 * 16
    assert torch.equal(unet(x, ctx, 10), before)          # B = 0
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.1)
    (unet(x, ctx, 10) - before).pow(2).mean().add(unet(x, ctx, 10).mean()).backward()
    optimizer.step()
    assert not torch.allclose(unet(x, ctx, 10), before)
    unload_lora(unet)
    assert all(torch.equal(v, base_weights[k]) for k, v in unet.state_dict().items())


def test_fuse_lora_folds_the_update_into_the_weights(models, tmp_path):
    ref, pipe = models
    path = write_kohya_file(tmp_path / "lora.safetensors",
                            random_lora(adapted_layers(ref["unet"], UNET_ENDINGS + ("conv1",)), seed=6), {})
    load_lora_weights(pipe, path, scale=0.7)
    with_lora = outputs(pipe, "ours")[0]
    assert fuse_lora(pipe.unet) > 0
    pipe.fuse_lora()                                       # nothing left to fuse: a no-op
    assert not lora_layers(pipe.unet)
    assert rel_err(outputs(pipe, "ours")[0], with_lora) < TOL


def test_saved_lora_loads_back_with_the_same_outputs(models, tmp_path):
    _, pipe = models
    add_lora(pipe.unet, rank=3, alpha=1.5)
    add_lora(pipe.clip, rank=2)
    for layer in [*lora_layers(pipe.unet).values(), *lora_layers(pipe.clip).values()]:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    expected = outputs(pipe, "ours")
    path = pipe.save_lora_weights(tmp_path / "mine.safetensors")
    pipe.unload_lora_weights()
    assert rel_err(outputs(pipe, "ours")[0], expected[0]) > 1e-3
    pipe.load_lora_weights(path)
    got = outputs(pipe, "ours")
    assert rel_err(got[0], expected[0]) < TOL and rel_err(got[1], expected[1]) < TOL


def test_set_lora_scale_zero_turns_it_off(models, tmp_path):
    ref, pipe = models
    plain = outputs(pipe, "ours")[0]
    load_lora_weights(pipe, write_kohya_file(tmp_path / "l.safetensors",
                                             random_lora(adapted_layers(ref["unet"], UNET_ENDINGS), 7), {}))
    set_lora_scale(pipe.unet, 0.0)
    assert rel_err(outputs(pipe, "ours")[0], plain) < TOL


# --- reading files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem, path", [
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in"),
    ("up_blocks_2_resnets_1_time_emb_proj", "up_blocks.2.resnets.1.time_emb_proj"),
    ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
])
def test_kohya_names_become_diffusers_module_paths(stem, path):
    assert kohya_to_module_path(stem) == path


def test_text_encoder_keys_read_the_same_with_or_without_text_model_prefix(tmp_path):
    w = {"lora_A.weight": torch.randn(2, 128), "lora_B.weight": torch.randn(128, 2)}
    for name in ("a", "b"):
        prefix = "text_encoder." + ("text_model." if name == "b" else "") + "encoder.layers.0.self_attn.q_proj"
        save_file({f"{prefix}.{k}": v for k, v in w.items()}, str(tmp_path / f"{name}.safetensors"))
    pipes = [sd.StableDiffusion(**reference_and_ours()[1]) for _ in range(2)]
    for p, name in zip(pipes, ("a", "b")):
        load_lora_weights(p, tmp_path / f"{name}.safetensors")
        assert list(lora_layers(p.clip)) == ["layers.0.self_attn.to_q"]


def test_old_diffusers_names_are_read(tmp_path):
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up},
              str(tmp_path / "old.safetensors"))
    found = read_lora_file(tmp_path / "old.safetensors")["unet"]
    assert list(found) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    assert torch.equal(found["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"].up, up)


@pytest.mark.parametrize("tensors, message", [
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1280)}, "SDXL"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2)},
     "rank mismatch"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)},
     "another model family"),
    ({"lora_unet_down_blocks_0_attentions_7_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
      "lora_unet_down_blocks_0_attentions_7_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, "matches no layer"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64),
      "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, "CompVis block names, as in SDXL"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32, 1, 1)}, r"no up \(B\)"),
    ({"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(4)}, "neither a diffusers"),
])
def test_bad_lora_file_gets_one_line_naming_key_and_file(models, tmp_path, tensors, message):
    _, pipe = models
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message) as e:
        load_lora_weights(pipe, tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not lora_layers(pipe.unet)                     # nothing half-loaded
