"""ControlNet: the same residuals and images as diffusers' ControlNetModel / StableDiffusionControlNetPipeline on
the same weights, files of both layouts loaded safely, and bad inputs refused in one line with nothing changed."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import sd
import sd.cli.generate
from sd.cli import main
from sd.controlnet import ControlNet, ControlNetConfig, canny_control_image
from sd.io.checkpoint import save_checkpoint
from sd.io.controlnet import load_controlnet, save_controlnet
from sd.pipeline import StableDiffusion
from tests.reference import randomize, reference_and_ours, rel_err
from tests.test_editing_inputs import readme_messages
from tests.test_pipeline import SD15_SCHEDULER
from tests.test_tokenizer import _clip_merges_gz, _write_standard_clip_tokenizer_folder

TOL = 1e-5            # residuals and the UNet's output, relative to their scale (as tests/test_model_parity.py)
TOL_IMAGES = 1e-4     # whole sampling runs, absolute in [0, 1] (as tests/test_pipeline.py)
SKIPS = 12            # SD v1's UNet keeps 12 skips: the input conv's, 3 per level with a downsampler, 2 in the last


def diffusers_controlnet(cfg: sd.UNetConfig, seed: int):
    """diffusers' ControlNetModel at `cfg`'s widths (SD v1.5's 4-level layout), every weight random, zero convs too."""
    from diffusers import ControlNetModel
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    net = ControlNetModel(in_channels=cfg.in_channels, down_block_types=down, block_out_channels=cfg.block_channels,
                          layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.context_dim,
                          attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True,
                          freq_shift=0)
    return randomize(net, seed).eval()


# --- the original layout, written in this test from diffusers' names (the inverse of diffusers' converter) ----------
RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                      "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def original_name(key: str, layers_per_block: int = 2) -> str:
    """A diffusers ControlNetModel key -> lllyasviel's `control_model.*` key."""
    parts = key.split(".")
    per_level = layers_per_block + 1
    if parts[0] == "time_embedding":
        name = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
    elif parts[0] == "conv_in":
        name = f"input_blocks.0.0.{parts[1]}"
    elif parts[0] == "controlnet_cond_embedding":
        index = {"conv_in": 0, "conv_out": 7}.get(parts[1])
        index = int(parts[2]) + 1 if index is None else index
        name = f"input_hint_block.{2 * index}.{parts[-1]}"
    elif parts[0] == "controlnet_down_blocks":
        name = f"zero_convs.{parts[1]}.0.{parts[2]}"
    elif parts[0] == "controlnet_mid_block":
        name = f"middle_block_out.0.{parts[1]}"
    elif parts[0] == "down_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            name = f"input_blocks.{per_level * (level + 1)}.0.op.{parts[-1]}"
        elif kind == "resnets":
            name = f"input_blocks.{per_level * level + int(parts[3]) + 1}.0.{RESNET_TO_ORIGINAL[parts[4]]}.{parts[5]}"
        else:   # attentions: the spatial transformer's inner names are the same in both layouts
            name = f"input_blocks.{per_level * level + int(parts[3]) + 1}.1.{'.'.join(parts[4:])}"
    elif parts[0] == "mid_block":
        if parts[1] == "attentions":
            name = f"middle_block.1.{'.'.join(parts[3:])}"
        else:
            name = f"middle_block.{2 * int(parts[2])}.{RESNET_TO_ORIGINAL[parts[3]]}.{parts[4]}"
    else:
        raise KeyError(key)
    return "control_model." + name


def original_state(ref) -> dict[str, torch.Tensor]:
    return {original_name(k): v.clone() for k, v in ref.state_dict().items()}


# --- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A random diffusers ControlNet, saved as a folder; ours loaded from it; the diffusers/sd UNets and models."""
    torch.manual_seed(0)
    ref_models, our_models = reference_and_ours(seed=5)
    cfg = sd.UNetConfig.tiny()
    ref_a, ref_b = diffusers_controlnet(cfg, 11), diffusers_controlnet(cfg, 12)
    folder_a, folder_b = tmp_path_factory.mktemp("cn_a"), tmp_path_factory.mktemp("cn_b")
    ref_a.save_pretrained(folder_a)
    ref_b.save_pretrained(folder_b)
    return dict(ref_models=ref_models, our_models=our_models, ref_a=ref_a, ref_b=ref_b, folder_a=folder_a,
                folder_b=folder_b, ours_a=load_controlnet(folder_a))


def random_inputs(batch=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 128, generator=g),
            torch.rand(batch, 3, 8 * side, 8 * side, generator=g))


# --- the model ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,scale", [(0, 1.0), (500, 0.7), (999, 1.3)])
def test_controlnet_residuals_match_diffusers(nets, t, scale):
    x, ctx, hint = random_inputs()
    with torch.no_grad():
        expected_down, expected_mid = nets["ref_a"](x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                                                     conditioning_scale=scale, return_dict=False)
        down, mid = nets["ours_a"](x, ctx, t, hint, scale)
    assert len(down) == len(expected_down) == SKIPS
    for got, want in zip(down, expected_down):
        assert got.shape == want.shape
        assert rel_err(got, want) < TOL
    assert rel_err(mid, expected_mid) < TOL


def test_unet_with_controlnet_residuals_matches_diffusers(nets):
    x, ctx, hint = random_inputs(seed=1)
    with torch.no_grad():
        down, mid = nets["ref_a"](x, 300, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        expected = nets["ref_models"]["unet"](x, 300, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                                              mid_block_additional_residual=mid).sample
        got = nets["our_models"]["unet"](x, ctx, 300, down_residuals=list(down), mid_residual=mid)
        plain = nets["our_models"]["unet"](x, ctx, 300)
    assert rel_err(got, expected) < TOL
    assert rel_err(plain, expected) > 100 * TOL      # the residuals do change the prediction


def test_a_new_controlnet_changes_nothing_until_trained(nets):
    """Zero convolutions (and the embedding's zero last conv): all 13 residuals start at exactly zero."""
    unet = nets["our_models"]["unet"]
    net = ControlNet.from_unet(unet)
    x, ctx, hint = random_inputs(seed=2)
    with torch.no_grad():
        down, mid = net(x, ctx, 100, hint)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
    assert torch.equal(net.down[1].res[0].conv1.weight, unet.down[1].res[0].conv1.weight)   # a copy of the encoder
    # the gradient reaches the zero convolutions' weights (they learn), though their output is zero
    net.train().requires_grad_(True)
    down, mid = net(x, ctx, 100, hint)
    (sum(d.sum() for d in down) + mid.sum()).backward()
    assert net.zero_convs[5].weight.grad.abs().sum() > 0


def test_unet_refuses_residuals_of_the_wrong_shape(nets):
    unet = nets["our_models"]["unet"]
    x, ctx, hint = random_inputs(seed=3)
    with torch.no_grad():
        down, mid = nets["ours_a"](x, ctx, 10, hint)
        with pytest.raises(ValueError, match=r"one tensor per skip \(12\), got 11"):
            unet(x, ctx, 10, down_residuals=down[:-1], mid_residual=mid)
        with pytest.raises(ValueError, match=r"mid_residual must have shape \(2, 64, 2, 2\).*got \(2, 32, 2, 2\)"):
            unet(x, ctx, 10, down_residuals=down, mid_residual=mid[:, :32])
        with pytest.raises(ValueError, match=r"down_residuals\[3\] must have shape \(2, 32, 8, 8\)"):
            unet(x, ctx, 10, down_residuals=down[:3] + [down[3][:1]] + down[4:], mid_residual=mid)


# --- loading files --------------------------------------------------------------------------------------------------

def _same_weights(a: ControlNet, b: ControlNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_test_mapping_is_the_inverse_of_diffusers_converter(nets):
    """This test's original-layout names, read back by diffusers' own converter, give the diffusers weights."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    ref = nets["ref_a"]
    back = convert_controlnet_checkpoint(original_state(ref), dict(ref.config))
    expected = ref.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_controlnet_files_load_the_same_weights(nets, tmp_path, suffix):
    state = original_state(nets["ref_a"])
    # ControlNet 1.0 files also hold the SD model they were trained with: skipped
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    state["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    path = tmp_path / f"control_sd15_test{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    loaded = load_controlnet(path)
    assert loaded.config == nets["ours_a"].config
    assert _same_weights(loaded, nets["ours_a"])


def test_diffusers_single_file_loads_the_same_weights(nets, tmp_path):
    path = tmp_path / "controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in nets["ref_a"].state_dict().items()}, str(path))
    assert _same_weights(load_controlnet(path), nets["ours_a"])


def test_widths_are_read_off_the_shapes(tmp_path):
    cfg = sd.UNetConfig(block_channels=(32, 32, 64, 64), context_dim=64, heads=2, layers_per_block=1)
    ref = diffusers_controlnet(cfg, 3)
    ref.save_pretrained(tmp_path)
    loaded = load_controlnet(tmp_path)
    assert (loaded.config.block_channels, loaded.config.layers_per_block, loaded.config.context_dim,
            loaded.config.heads) == ((32, 32, 64, 64), 1, 64, 2)
    x, ctx, hint = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = ref(x, 20, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)[1]
        assert rel_err(loaded(x, ctx, 20, hint)[1], want) < TOL


def test_file_mismatches_name_the_key_as_the_file_spells_it(nets, tmp_path):
    state = original_state(nets["ref_a"])
    del state["control_model.middle_block_out.0.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing `control_model\.middle_block_out\.0\.bias`") as e:
        load_controlnet(tmp_path / "missing.pth")
    assert "\n" not in str(e.value) and "missing.pth" in str(e.value)

    state = original_state(nets["ref_a"])
    state["control_model.zero_convs.3.0.weight"] = torch.zeros(7, 7, 1, 1)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"`control_model\.zero_convs\.3\.0\.weight` has shape \(7, 7, 1, 1\)"):
        load_controlnet(tmp_path / "shape.safetensors")

    diffusers_state = {k: v.contiguous() for k, v in nets["ref_a"].state_dict().items()}
    diffusers_state["controlnet_down_blocks.12.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(diffusers_state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected `controlnet_down_blocks\.12\.weight`"):
        load_controlnet(tmp_path / "extra.safetensors")

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"not a ControlNet: no `controlnet_cond_embedding\.\*`"):
        load_controlnet(tmp_path / "other.safetensors")


def test_an_sd2_controlnet_is_refused_by_family(tmp_path):
    ref = diffusers_controlnet(sd.UNetConfig(block_channels=(32, 64, 64, 64), context_dim=1024), 6)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"looks like an SD 2\.x checkpoint.*only SD v1\.x is supported"):
        load_controlnet(tmp_path)


def test_a_controlnet_for_the_shipped_small_model_saves_loads_and_steers_it(tmp_path):
    """The small model (3 levels, 1 block each, 4 heads, a 4x VAE): a ControlNet copied from its UNet, with a
    two-halvings embedding, round-trips through save_controlnet with its head count, and steers generate."""
    pipe = sd.load_checkpoint(device="cpu")
    net = randomize(ControlNet.from_unet(pipe.unet, embedding_channels=(16, 32, 96)), 8)
    path = save_controlnet(net, tmp_path / "shapes_controlnet.safetensors")
    loaded = pipe.load_controlnet(path)
    assert loaded.config == net.config and loaded.config.heads == pipe.unet.config.heads == 4
    assert _same_weights(loaded, net)
    edges = Image.new("RGB", (32, 32))
    images = pipe.generate("a red circle", control_image=edges, num_inference_steps=2, seed=0, progress=False,
                           output_type="pt")
    pipe.unload_controlnets()
    plain = pipe.generate("a red circle", num_inference_steps=2, seed=0, progress=False, output_type="pt")
    assert images.shape == plain.shape == (1, 3, 32, 32)
    assert (images - plain).abs().max() > 1e-3                     # the random ControlNet does steer


def test_a_pickle_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1), "x": np.float64}, path)
    with pytest.raises(ValueError, match=r"holds Python objects beyond tensors.*refused"):
        load_controlnet(path)


@pytest.mark.full_size
def test_sd15_sized_original_controlnet_file_loads_as_sd15s_controlnet_and_matches_diffusers(tmp_path):
    """SD v1.5's full layout and widths (320..1280, 768-wide text, 8 heads) from an original-layout file."""
    torch.manual_seed(0)
    ref = diffusers_controlnet(sd.UNetConfig(), 21)
    path = tmp_path / "control_full.safetensors"
    save_file(original_state(ref), str(path))
    ours = load_controlnet(path)
    assert ours.config == ControlNetConfig()            # SD v1.5's UNet config and the (16, 32, 96, 256) embedding
    x, ctx, hint = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected_down, expected_mid = ref(x, 400, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        down, mid = ours(x, ctx, 400, hint)
    assert max(rel_err(a, b) for a, b in zip([*down, mid], [*expected_down, expected_mid])) < TOL


# --- the pipeline ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(nets, tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    folder = _write_standard_clip_tokenizer_folder(_clip_merges_gz(), tmp_path_factory.mktemp("t") / "tokenizer")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    ref = nets["ref_models"]

    def reference(controlnet):
        pipe = StableDiffusionControlNetPipeline(
            vae=ref["vae"], text_encoder=ref["clip"], tokenizer=hf_tok, unet=ref["unet"], controlnet=controlnet,
            scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    mine = StableDiffusion(**nets["our_models"], tokenizer=sd.CLIPTokenizer(folder))
    return mine, reference(nets["ref_a"]), reference([nets["ref_a"], nets["ref_b"]])


def control_picture(seed: int, side: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize("scale,start,end", [(1.0, 0.0, 1.0), (0.6, 0.25, 0.75)])
def test_ddim_run_with_controlnet_matches_diffusers_pipeline(nets, pipes, scale, start, end):
    mine, ref, _ = pipes
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle on a blue background", "a star"]
    picture = control_picture(0)
    with torch.no_grad():
        expected = ref(prompts, image=picture, height=64, width=64, num_inference_steps=8, guidance_scale=7.5,
                       latents=latents, controlnet_conditioning_scale=scale, control_guidance_start=start,
                       control_guidance_end=end, output_type="pt").images
        plain = mine.generate(prompts, height=64, width=64, num_inference_steps=8, latents=latents,
                              output_type="pt", progress=False)
    mine.load_controlnet(nets["folder_a"])
    try:
        got = mine.generate(prompts, num_inference_steps=8, guidance_scale=7.5, latents=latents, output_type="pt",
                            progress=False, control_image=picture, controlnet_conditioning_scale=scale,
                            control_guidance_start=start, control_guidance_end=end)
    finally:
        mine.unload_controlnets()
    assert got.shape == (2, 3, 64, 64)
    assert (got - expected).abs().max() < TOL_IMAGES
    assert (plain - expected).abs().max() > 100 * TOL_IMAGES      # the control did change the pictures


def test_two_controlnets_match_diffusers_multi_controlnet(nets, pipes):
    mine, _, ref = pipes
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pictures = [control_picture(1), control_picture(2, side=128)]    # the second is resized to the first's size
    with torch.no_grad():
        expected = ref("a star", image=pictures, height=64, width=64, num_inference_steps=6, guidance_scale=5.0,
                       latents=latents, controlnet_conditioning_scale=[0.8, 0.5], control_guidance_end=[1.0, 0.5],
                       output_type="pt").images
    mine.load_controlnet(nets["folder_a"])
    mine.load_controlnet(nets["folder_b"])
    try:
        got = mine.generate("a star", height=64, width=64, num_inference_steps=6, guidance_scale=5.0,
                            latents=latents, output_type="pt", progress=False, control_image=pictures,
                            controlnet_conditioning_scale=[0.8, 0.5], control_guidance_end=[1.0, 0.5])
    finally:
        mine.unload_controlnets()
    assert (got - expected).abs().max() < TOL_IMAGES


NAN_PICTURE = np.full((64, 64, 3), np.nan, dtype=np.float32)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(control_image=Image.new("RGB", (70, 64))), ValueError,
     r"control_image width must be a positive multiple of 64.*got 70"),
    (dict(control_image=torch.rand(1, 3, 64, 64)), TypeError, r"control_image must be a PIL image or a numpy array"),
    (dict(control_image=np.zeros((3, 64, 64), np.uint8)), ValueError, r"channels first"),
    (dict(control_image=NAN_PICTURE), ValueError, r"control_image array has NaN"),
    (dict(control_image=np.full((64, 64, 3), 200.0)), ValueError, r"float array must lie in \[0, 1\]"),
    (dict(controlnet_conditioning_scale=float("nan")), ValueError,
     r"controlnet_conditioning_scale must be a finite number, got nan"),
    (dict(controlnet_conditioning_scale="1.0"), TypeError, r"controlnet_conditioning_scale must be a number, got str"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5]), ValueError, r"one entry per loaded ControlNet \(1\), got 2"),
    (dict(control_guidance_start=0.8, control_guidance_end=0.2), ValueError,
     r"control_guidance_start must be below control_guidance_end, got 0.8 and 0.2"),
    (dict(control_guidance_end=1.5), ValueError, r"control_guidance_end must lie in \[0.0, 1.0\], got 1.5"),
    (dict(control_image=[Image.new("RGB", (64, 64))] * 2), ValueError, r"2 pictures for 1 loaded ControlNets"),
    (dict(init_image=Image.new("RGB", (64, 64))), ValueError, r"control_image works with text to image only"),
])
def test_bad_control_inputs_get_one_line_and_change_nothing(nets, pipes, kwargs, error, message):
    mine = pipes[0]
    mine.load_controlnet(nets["folder_a"])
    before = {k: v.clone() for k, v in mine.controlnets[0].state_dict().items()}
    arguments = dict(control_image=Image.new("RGB", (64, 64)), num_inference_steps=2, progress=False, **{})
    arguments.update(kwargs)
    try:
        with pytest.raises(error, match=message) as e:
            mine.generate("a cat", **arguments)
        assert "\n" not in str(e.value)
        assert len(mine.controlnets) == 1
        assert all(torch.equal(v, mine.controlnets[0].state_dict()[k]) for k, v in before.items())
    finally:
        mine.unload_controlnets()


def test_control_image_without_a_controlnet_is_refused(pipes):
    with pytest.raises(ValueError, match=r"control_image needs a ControlNet: load one first"):
        pipes[0].generate("a cat", control_image=Image.new("RGB", (64, 64)), num_inference_steps=1, progress=False)


def test_a_controlnet_that_does_not_fit_the_unet_is_refused(pipes, tmp_path):
    mine = pipes[0]
    ref = diffusers_controlnet(sd.UNetConfig(block_channels=(32, 32, 64, 64), context_dim=128, heads=8), 4)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the loaded model: its block_channels is \(32, 32, 64, 64\), "
                                         r"the UNet's is \(32, 64, 64, 64\)"):
        mine.load_controlnet(tmp_path)
    assert mine.controlnets == []


def test_readme_refused_input_rows_for_controlnet_are_the_messages_the_code_gives(nets, pipes):
    mine = pipes[0]
    black = Image.new("RGB", (64, 64))
    cases = {
        "`control_image` of 70×64 pixels": dict(control_image=Image.new("RGB", (70, 64))),
        "`controlnet_conditioning_scale=nan`": dict(control_image=black, controlnet_conditioning_scale=float("nan")),
        "`control_guidance_start=0.8, control_guidance_end=0.2`": dict(control_image=black, control_guidance_start=0.8,
                                                                      control_guidance_end=0.2),
    }
    rows = readme_messages()
    with pytest.raises(ValueError) as e:
        mine.generate("x", control_image=black, num_inference_steps=1, progress=False)
    assert str(e.value) == rows["`control_image` with no ControlNet loaded"]
    mine.load_controlnet(nets["folder_a"])
    try:
        for row, kwargs in cases.items():
            with pytest.raises(ValueError) as e:
                mine.generate("x", num_inference_steps=1, progress=False, **kwargs)
            assert str(e.value) == rows[row]
    finally:
        mine.unload_controlnets()


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_generates_a_controlled_picture_the_control_image_size(nets, tmp_path, capsys):
    models = nets["our_models"]
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", models["clip"], models["encoder"], models["decoder"],
                                 models["unet"])
    edges = tmp_path / "edges.png"
    canny_control_image(control_picture(3, side=128).resize((128, 64))).save(edges)
    out = tmp_path / "controlled.png"
    assert main(["generate", "a star", "--checkpoint", str(checkpoint), "--controlnet", str(nets["folder_a"]),
                 "--control-image", str(edges), "--control-scale", "0.8", "--steps", "2", "--seed", "0",
                 "--out", str(out)]) == 0
    assert f"saved {out} (128x64" in capsys.readouterr().out
    assert Image.open(out).size == (128, 64)


def test_cli_wants_one_control_image_per_controlnet(nets, tmp_path, capsys):
    assert main(["generate", "a star", "--checkpoint", str(tmp_path / "unread.safetensors"),
                 "--controlnet", str(nets["folder_a"])]) == 2
    assert "give one --control-image per --controlnet, got 0 for 1" in capsys.readouterr().err
    assert main(["generate", "a star", "--control-image", "edges.png", "--canny"]) == 2
    assert "--control-image and --canny need a ControlNet: --controlnet PATH" in capsys.readouterr().err


def test_cli_canny_turns_a_photo_into_its_edges_first(nets, tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:48, 16:48] = 230
    Image.fromarray(picture).save(photo)
    seen = {}

    def fake_generate_and_save(args, **inputs):
        seen.update(inputs)
    monkeypatch.setattr(sd.cli.generate, "_generate_and_save", fake_generate_and_save)
    assert main(["generate", "a star", "--controlnet", str(nets["folder_a"]), "--control-image", str(photo),
                 "--canny"]) == 0
    edges = seen["control_image"][0]
    assert np.asarray(edges).any()                                  # the square's outline, not a blank picture
    assert np.array_equal(np.asarray(edges), np.asarray(canny_control_image(Image.open(photo))))


# --- making control images ------------------------------------------------------------------------------------------

def test_canny_control_image_draws_the_outline_of_a_shape():
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:48, 16:48] = (220, 40, 40)                         # a red square on black
    edges = canny_control_image(picture, low=50, high=100)
    assert edges.mode == "RGB" and edges.size == (64, 64)
    arr = np.asarray(edges)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and set(np.unique(arr)) <= {0, 255}
    on = arr[..., 0] > 0
    assert on[14:18, 20:44].any(axis=0).all()                      # the top side is traced along its length
    assert not on[24:40, 24:40].any() and not on[:8].any()         # nothing inside the square or far outside


def test_canny_refuses_crossed_thresholds():
    with pytest.raises(ValueError, match=r"low must be <= high"):
        canny_control_image(Image.new("RGB", (32, 32)), low=200, high=100)
