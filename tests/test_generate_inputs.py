"""Bad input to `generate` gets one line that names the parameter, before any work; a non-finite result is an
error with its likely cause, never a silent black picture; a list of seeds reproduces each image alone."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sd
from sd.images import SIGNED, UNIT, to_pil

PROMPT = "a red circle on a blue background"
FAST = dict(num_inference_steps=3, progress=False, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return sd.load_checkpoint(device="cpu")


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "\x1b" not in text, text
    return text


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale="7.5"), TypeError, "guidance_scale must be a number"),
    (dict(eta=math.nan), ValueError, "eta must be a finite number"),
    (dict(eta=2.0), ValueError, "eta must lie in [0.0, 1.0]"),
    (dict(strength=math.inf), ValueError, "strength must be a finite number"),
    (dict(seed=2 ** 70), ValueError, "seed must be an integer in [0, 18446744073709551615]"),
    (dict(seed=-1), ValueError, "seed must be an integer in [0,"),
    (dict(seed="3"), TypeError, "seed must be an integer"),
    (dict(seed=[1, 2, 3]), ValueError, "3 seeds for 1 images"),
    (dict(num_images=True), TypeError, "num_images must be an integer"),
    (dict(num_images=0), ValueError, "num_images must be an integer in [1,"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), TypeError, "latents must be a torch.Tensor"),
    (dict(latents=torch.full((1, 4, 4, 4), math.nan)), ValueError, "latents has NaN or infinite values"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), ValueError, "latents must have shape (1, 4, 8, 8)"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(output_type="np"), ValueError, "output_type must be one of"),
    (dict(negative_prompt=7), TypeError, "negative_prompt must be a string or a non-empty list of strings"),
])
def test_bad_arguments_are_named_in_one_line(pipe, kwargs, error, words):
    with pytest.raises(error) as e:
        pipe.generate(PROMPT, **{**FAST, **kwargs})
    assert words in one_line(e.value)


@pytest.mark.parametrize("prompt", [None, 3, [], ["ok", None]])
def test_a_prompt_that_is_not_text_is_named(pipe, prompt):
    with pytest.raises(TypeError) as e:
        pipe.generate(prompt, **FAST)
    assert "prompt must be a string or a non-empty list of strings" in one_line(e.value)


@pytest.mark.parametrize("array, words", [
    (np.zeros((3, 32, 32), np.float32), "must be (H, W) or (H, W, 3)"),       # channels first
    (np.full((32, 32, 3), -0.5, np.float32), "in SD's [-1, 1]?"),             # SD's range
    (np.full((32, 32, 3), 200.0, np.float32), "8-bit values?"),               # bytes as floats
    (np.full((32, 32, 3), 300.0, np.float32), "must lie in [0, 1]"),          # over 255
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((32, 32, 3), np.int64), "uint8 in 0..255 or float in [0, 1]"),
])
def test_init_image_arrays_outside_the_conventions_are_refused(pipe, array, words):
    with pytest.raises(ValueError) as e:
        pipe.generate(PROMPT, init_image=array, strength=0.5, **FAST)
    assert words in one_line(e.value)


def test_init_image_of_another_type_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="init_image must be a PIL image"):
        pipe.generate(PROMPT, init_image=torch.zeros(32, 32, 3), **FAST)


def test_the_three_init_image_conventions_give_the_same_picture(pipe):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    runs = [pipe.generate(PROMPT, init_image=image, strength=0.5, seed=1, **FAST)
            for image in (Image.fromarray(pixels), pixels, pixels.astype(np.float32) / 255)]
    assert torch.allclose(runs[0], runs[1]) and torch.allclose(runs[0], runs[2], atol=1e-6)


def test_a_request_too_large_for_memory_is_refused_before_allocating(pipe):
    with pytest.raises(ValueError) as e:
        pipe.generate(PROMPT, height=65536, width=65536, **FAST)
    text = one_line(e.value)
    assert "need about" in text and "GB" in text and "free" in text
    with pytest.raises(ValueError, match="need about"):
        pipe.generate(PROMPT, num_images=10 ** 7, **FAST)


def test_huge_guidance_is_an_error_with_its_cause_not_a_black_picture(pipe):
    with pytest.raises(FloatingPointError) as e:
        pipe.generate(PROMPT, guidance_scale=1e30, seed=0, **FAST)
    assert "guidance_scale 1e+30" in one_line(e.value)


def test_nan_weights_are_named_as_the_cause(pipe):
    broken = sd.load_checkpoint(device="cpu")
    with torch.no_grad():
        broken.unet.conv_in.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError) as e:
        broken.generate(PROMPT, seed=0, **FAST)
    assert "unet weights contain NaN" in one_line(e.value)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a"])
def test_image_i_of_a_batch_with_a_list_of_seeds_equals_the_run_with_seed_i(pipe, sampler):
    batch = pipe.generate([PROMPT, "a green square on a white background"], seed=[11, 12], sampler=sampler, **FAST)
    alone = pipe.generate("a green square on a white background", seed=12, sampler=sampler, **FAST)
    assert (batch[1] - alone[0]).abs().max() < 1e-4
    other = pipe.generate("a green square on a white background", seed=11, sampler=sampler, **FAST)
    assert (batch[1] - other[0]).abs().max() > 0.05          # the seed, not the prompt, made them equal


def test_with_one_seed_image_0_equals_the_single_run_and_image_1_differs(pipe):
    batch = pipe.generate(PROMPT, num_images=2, seed=3, **FAST)
    alone = pipe.generate(PROMPT, seed=3, **FAST)
    assert (batch[0] - alone[0]).abs().max() < 1e-4
    assert (batch[1] - alone[0]).abs().max() > 0.05


def test_to_pil_names_its_range():
    signed = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_pil(signed, SIGNED)[0].getpixel((0, 0)) == (0, 128, 255)
    assert to_pil(signed.clamp(0, 1), UNIT)[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ValueError, match="value_range"):
        to_pil(signed, (0, 255))


def test_cli_huge_guidance_is_one_line_and_exit_2_with_no_picture_written(tmp_path, capsys):
    from sd.cli import main
    out = tmp_path / "image.png"
    assert main(["generate", PROMPT, "--cfg", "1e30", "--steps", "2", "--seed", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m sd generate: error: the latents became NaN or infinite")
    assert not out.exists()
