"""The editing APIs (inpaint, invert, interpolate, guidance by a loss) check every argument with the rules generate
uses, and masks follow the init-image rules: bad input gets one line naming it and what was expected, before any
work, and leaves the pipeline as it was."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sd
from sd.editing.guidance import colour_loss, generate_with_loss
from sd.editing.inpaint import inpaint
from sd.editing.interpolation import interpolate
from sd.training.data import ShapesDataset
from sd.images import SIGNED, to_pil

SIZE = 32                                          # the shipped model's native size
PROMPT = "a red circle on a blue background"
FAST = dict(num_inference_steps=2, progress=False)
MAX_SEED = 18446744073709551615                    # 2**64 - 1, the largest seed torch.Generator takes


@pytest.fixture(scope="module")
def pipe():
    return sd.load_checkpoint(device="cpu")


@pytest.fixture(scope="module")
def picture():
    return to_pil(ShapesDataset(length=1, image_size=SIZE, seed=1).pixels(0)[None], SIGNED)[0]


def right_half(value=1.0, dtype=np.float32) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype)
    mask[:, SIZE // 2:] = value
    return mask


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def refused(pipe, call, error, words) -> None:
    """`call()` raises `error` with `words` in one line; the pipeline draws the same image and has the same weights."""
    image = pipe.generate(PROMPT, seed=0, output_type="pt", **FAST)
    weights = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in pipe.models().items()}
    with pytest.raises(error) as e:
        call()
    assert words in one_line(e.value)
    assert torch.equal(pipe.generate(PROMPT, seed=0, output_type="pt", **FAST), image)
    for name, m in pipe.models().items():
        assert all(torch.equal(v, weights[name][k]) for k, v in m.state_dict().items())


# --- masks follow the init-image rules ---------------------------------------------------------------------------
def differing_channels() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE, 3), np.float32)
    mask[..., 0] = 1                                                     # red: which channel means "repaint"?
    return mask


@pytest.mark.parametrize("mask, error, words", [
    (np.full((SIZE, SIZE, 3), -1.0, np.float32) + np.stack([right_half(2.0)] * 3, -1), ValueError,
     "mask_image float array must lie in [0, 1], got values in [-1, 1] (in SD's [-1, 1]? pass (x + 1) / 2)"),
    (right_half(2.0), ValueError,
     "mask_image float array must lie in [0, 1], got values in [0, 2] (8-bit values? pass a uint8 array)"),
    (right_half(255.0), ValueError, "mask_image float array must lie in [0, 1], got values in [0, 255]"),
    (right_half(np.nan), ValueError, "mask_image array has NaN or infinite values"),
    (right_half(1, np.int64), ValueError,
     "mask_image array must be uint8 in 0..255, float in [0, 1] or bool, got dtype int64"),
    (right_half()[None], ValueError,
     "mask_image array must be (H, W), (H, W, 1) or (H, W, 3), got shape (1, 32, 32) (channels first?"),
    (np.zeros((SIZE, SIZE, 4), np.uint8), ValueError, "(RGBA? drop the alpha: array[..., :3])"),
    (differing_channels(), ValueError, "mask_image array's 3 channels must be equal"),
    (torch.from_numpy(right_half()), TypeError,
     "mask_image must be a PIL image or a numpy array (H, W), (H, W, 1) or (H, W, 3), got Tensor"),
    ([[0, 1], [1, 0]], TypeError, "mask_image must be a PIL image or a numpy array"),
    (right_half()[:16], ValueError, "mask_image must have the init image's size 32x32 (width x height), got 32x16"),
    (np.zeros((SIZE, SIZE), np.uint8), ValueError, "mask_image is all black: nothing to repaint"),
])
def test_a_mask_outside_the_picture_rules_is_refused_in_one_line(pipe, picture, mask, error, words):
    refused(pipe, lambda: pipe.inpaint(PROMPT, picture, mask, seed=0, **FAST), error, words)


def test_every_mask_convention_gives_the_same_inpainting(pipe, picture):
    """PIL (L and RGB), (H, W) uint8, (H, W, 1) float, equal-channel (H, W, 3) float and bool: one mask."""
    half = right_half()
    masks = [Image.fromarray((half * 255).astype(np.uint8)), Image.fromarray((half * 255).astype(np.uint8)).convert("RGB"),
             (half * 255).astype(np.uint8), half[..., None], np.stack([half] * 3, -1), half > 0.5]
    runs = [inpaint(pipe, PROMPT, picture, m, seed=3, output_type="latent", **FAST) for m in masks]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    everything = inpaint(pipe, PROMPT, picture, np.ones((SIZE, SIZE), np.float32), seed=3, output_type="latent",
                         **FAST)
    assert not torch.equal(everything, runs[0])                        # the mask did matter


def test_a_grey_init_image_is_its_three_equal_channels(pipe):
    grey = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    runs = [pipe.generate(PROMPT, init_image=image, strength=0.5, seed=1, output_type="pt", **FAST)
            for image in (grey, np.stack([grey] * 3, -1), Image.fromarray(grey))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


# --- seeds, steps, strengths and scales: the rules generate uses --------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(seed=-1), ValueError, f"seed must be an integer in [0, {MAX_SEED}], got -1"),
    (dict(seed=2 ** 64), ValueError, f"seed must be an integer in [0, {MAX_SEED}], got {2 ** 64}"),
    (dict(seed="3"), TypeError, "seed must be an integer, got str '3'"),
    (dict(seed=1.5), TypeError, "seed must be an integer, got float 1.5"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer from 1 to 1000 (the training steps), got 0"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an integer, got float 2.5"),
    (dict(strength=0.0), ValueError, "strength must be in (0, 1] (1: start from pure noise), got 0.0"),
    (dict(strength=1.5), ValueError, "strength must be in (0, 1]"),
    (dict(strength=math.nan), ValueError, "strength must be a finite number, got nan"),
    (dict(strength="1"), TypeError, "strength must be a number, got str '1'"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be a number, got str '7'"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be >= 0.0, got -1.0"),
    (dict(num_images=0), ValueError, "num_images must be an integer in [1, inf], got 0"),
    (dict(sampler="euler"), ValueError, "sampler must be one of ('ddim', 'ddpm') for editing"),
    (dict(output_type="np"), ValueError, "output_type must be one of 'pil', 'pt', 'latent', got 'np'"),
    (dict(keep_original_pixels="no"), TypeError, "keep_original_pixels must be True or False, got str 'no'"),
    (dict(negative_prompt=None), TypeError, "negative_prompt must be a string or a non-empty list of strings"),
])
def test_inpaint_checks_its_arguments_as_generate_does(pipe, picture, kwargs, error, words):
    refused(pipe, lambda: pipe.inpaint(PROMPT, picture, right_half(), **{**FAST, **kwargs}), error, words)


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=-1), "seed must be an integer in [0,"),
    (dict(guidance_scale="7"), "guidance_scale must be a number"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 1000"),
])
def test_generate_and_inpaint_refuse_the_same_argument_with_the_same_words(pipe, picture, kwargs, words):
    messages = []
    for call in (lambda: pipe.generate(PROMPT, **{**FAST, **kwargs}),
                 lambda: pipe.generate(PROMPT, init_image=picture, mask_image=right_half(), **{**FAST, **kwargs})):
        with pytest.raises((ValueError, TypeError)) as e:
            call()
        messages.append(one_line(e.value))
    assert words in messages[0] and messages[0] == messages[1]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(image=np.zeros((3, SIZE, SIZE), np.float32)), ValueError,
     "image array must be (H, W) or (H, W, 3), got shape (3, 32, 32) (channels first?"),
    (dict(image=np.full((SIZE, SIZE, 3), -0.5, np.float32)), ValueError,
     "image float array must lie in [0, 1], got values in [-0.5, -0.5] (in SD's [-1, 1]?"),
    (dict(image=torch.zeros(SIZE, SIZE, 3)), TypeError, "image must be a PIL image or a numpy array"),
    (dict(prompt=None), TypeError, "prompt must be a string, got NoneType None"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer from 1 to 1000 (the training steps), got 0"),
    (dict(num_inference_steps="10"), TypeError, "num_inference_steps must be an integer, got str '10'"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a finite number, got nan"),
])
def test_invert_checks_its_arguments(pipe, picture, kwargs, error, words):
    args = {"image": picture, **kwargs}
    refused(pipe, lambda: pipe.invert(args.pop("image"), **{**FAST, **args}), error, words)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(seed_a=-1), ValueError, f"seed_a must be an integer in [0, {MAX_SEED}], got -1"),
    (dict(seed_b="2"), TypeError, "seed_b must be an integer, got str '2'"),
    (dict(num_frames=1), ValueError, "num_frames must be an integer in [2, inf], got 1"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer from 1 to 1000 (the training steps), got 0"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be a number, got str '7'"),
    (dict(sampler="heun"), ValueError, "sampler must be one of 'ddpm', 'ddim', 'euler', 'euler_a', 'dpmpp2m'"),
    (dict(prompt_b=None), TypeError, "prompt_b must be a string, got NoneType None"),
])
def test_interpolate_checks_its_arguments(pipe, kwargs, error, words):
    args = {"prompt_a": "a red circle", "prompt_b": "a blue square", **kwargs}
    call = lambda: interpolate(pipe, args.pop("prompt_a"), args.pop("prompt_b"), **{**FAST, **args})
    refused(pipe, call, error, words)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(loss_scale=math.nan), ValueError, "loss_scale must be a finite number, got nan"),
    (dict(loss_scale="100"), TypeError, "loss_scale must be a number, got str '100'"),
    (dict(loss_fn=3), TypeError, "loss_fn must be callable"),
    (dict(seed=-1), ValueError, f"seed must be an integer in [0, {MAX_SEED}], got -1"),
    (dict(sampler="euler"), ValueError, "sampler must be one of ('ddim', 'ddpm') for editing"),
])
def test_generate_with_loss_checks_its_arguments(pipe, kwargs, error, words):
    args = {"loss_fn": lambda x0: x0.pow(2).mean(), "loss_scale": 1.0, **kwargs}
    call = lambda: generate_with_loss(pipe, PROMPT, args.pop("loss_fn"), args.pop("loss_scale"), **{**FAST, **args})
    refused(pipe, call, error, words)


@pytest.mark.parametrize("rgb, error, words", [
    (("1", 0, 0), TypeError, "each rgb value must be a number, got str '1'"),
    ((1.5, 0, 0), ValueError, "each rgb value must lie in [0.0, 1.0], got 1.5"),
    ((1, 0), ValueError, "rgb must be three numbers in [0, 1]"),
])
def test_colour_loss_checks_its_colour(pipe, rgb, error, words):
    with pytest.raises(error) as e:
        colour_loss(pipe, rgb)
    assert words in one_line(e.value)


def test_inversion_shows_a_progress_bar(pipe, picture, capsys):
    pipe.invert(picture, num_inference_steps=2, progress=True)
    assert "DDIM inversion" in capsys.readouterr().err


# --- the README's refused-input table says what the code says ---------------------------------------------------
def readme_messages() -> dict[str, str]:
    """The README's refused-input table: input column -> the message column, without the backticks."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = text.split("### Refused input", 1)[1].split("\n\n")[2]
    rows = [line.strip("|").split(" | ") for line in table.splitlines()[2:]]
    return {cells[0].strip(): cells[1].strip().strip("`") for cells in rows if len(cells) == 2}


def readme_cases(pipe, picture, tmp_path, monkeypatch):
    """Each adapter and editing row's input, as a call."""
    from safetensors.torch import save_file
    from sd.course.models import load_course_model
    half = right_half(2.0)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    up = torch.zeros(96, 2)
    up[0, 0] = math.nan
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 64), f"{stem}.lora_up.weight": up,
               f"{stem}.alpha": torch.tensor(2.0)}, str(tmp_path / "style.safetensors"))
    vectors = torch.zeros(1, 64)
    vectors[0, 0] = math.nan
    save_file({"<my-shape>": vectors}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<my-shape>": torch.zeros(1, 64)}, str(tmp_path / "good_embeds.safetensors"))
    differing = np.zeros((SIZE, SIZE, 3), np.float32)
    differing[..., 0] = 1

    def missing_checkpoint():
        monkeypatch.setenv("SD_CHECKPOINT", "/no/such.safetensors")
        load_course_model("cpu")

    return {
        "`mask_image` (H, W, 3) floats in [−1, 1]": lambda: pipe.inpaint("x", picture, np.full((SIZE, SIZE, 3), -1.0)),
        "`mask_image` floats 0 and 2": lambda: pipe.inpaint("x", picture, half),
        "`mask_image` (H, W, 3) with unequal channels": lambda: pipe.inpaint("x", picture, differing),
        "`mask_image` a torch tensor": lambda: pipe.inpaint("x", picture, torch.ones(SIZE, SIZE)),
        "`inpaint(seed=-1)` (as `generate`)": lambda: pipe.inpaint("x", picture, half / 2, seed=-1),
        "`inpaint(strength=0)`": lambda: pipe.inpaint("x", picture, half / 2, strength=0),
        "`generate(..., mask_image=mask, latents=x)`": lambda: pipe.generate("x", init_image=picture,
                                                                            mask_image=half / 2,
                                                                            latents=torch.zeros(1, 4, 8, 8)),
        "`inpaint(keep_original_pixels=\"no\")`": lambda: pipe.inpaint("x", picture, half / 2,
                                                                       keep_original_pixels="no"),
        "`invert(num_inference_steps=0)` (as every sampling API)": lambda: pipe.invert(picture, num_inference_steps=0),
        "`invert(prompt=[\"a\", \"b\"])`": lambda: pipe.invert(picture, prompt=["a", "b"]),
        "`interpolate(..., num_frames=1)`": lambda: interpolate(pipe, "a", "b", 1),
        "`generate_with_loss(..., loss_scale=nan)`": lambda: generate_with_loss(pipe, "a", lambda x: x.sum(), math.nan),
        "a LoRA file with NaN (any layout)": lambda: pipe.load_lora_weights(tmp_path / "style.safetensors"),
        "a textual-inversion embedding with NaN": lambda: pipe.load_textual_inversion(
            tmp_path / "learned_embeds.safetensors"),
        "`load_textual_inversion(path, token=\"Red\")`": lambda: pipe.load_textual_inversion(
            tmp_path / "good_embeds.safetensors", token="Red"),
        "`$SD_CHECKPOINT` set to a missing path": missing_checkpoint,
    }


def test_the_readme_table_gives_each_adapter_and_editing_message_as_the_code_says_it(pipe, picture, tmp_path,
                                                                                      monkeypatch):
    table = readme_messages()
    cases = readme_cases(pipe, picture, tmp_path, monkeypatch)
    assert set(cases) <= set(table), set(cases) - set(table)
    for row, call in cases.items():
        with pytest.raises((ValueError, TypeError)) as e:
            call()
        assert one_line(e.value) == table[row], row


@pytest.mark.parametrize("kwargs, words", [
    (dict(latents=torch.zeros(1, 4, 8, 8)), "inpainting (mask_image) does not take latents"),
    (dict(callback=lambda *args: None), "inpainting (mask_image) does not take callback"),
    (dict(eta=0.5), "inpainting (mask_image) does not take eta"),
])
def test_generate_with_a_mask_refuses_the_arguments_inpainting_would_ignore(pipe, picture, kwargs, words):
    refused(pipe, lambda: pipe.generate(PROMPT, init_image=picture, mask_image=right_half(), **FAST, **kwargs),
            ValueError, words)
