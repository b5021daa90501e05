"""The shipped default model: loads with no argument, and draws what the prompt asks (judged by a classifier):
shape, color and background of short prompts, and all five attributes of full captions, left and right included."""
import pytest
import torch

import sd
from sd.io.checkpoint import DEFAULT_MODEL
from sd.training.data import ATTRIBUTE_NAMES, COLORS, HELD_OUT, PALETTE, training_combinations
from sd.training.evaluation import (CLASSIFIER_MIN_ACCURACY, LAYOUTS, classifier_accuracy, generate, load_classifier,
                                    prompt_accuracy)

# A broken model gets about 1/90 of these right (1 in 3 shapes x 6 colors x 5 backgrounds); the shipped one
# measured >= 0.9 on the full prompt set (README), so 0.7 on this small sample leaves room for chance.
SMALL_SET_MIN_ACCURACY = 0.7
# A small circle (radius 5.5 px at 32 x 32) covers about 95 pixels; count only what is surely the shape.
MIN_SHAPE_PIXELS = 40
SMALL_SET = [(c, True) for c in HELD_OUT[:3]] + [(c, False) for c in training_combinations()[::28]]
# Full captions: two held-out and two seen combinations in all six layouts (large centre, small in five places).
# Left and right drawn at random (the model before issue 11) would get about two thirds of the positions right.
FULL_SET = [((*c, *layout), held) for c, held in [(HELD_OUT[3], True), (HELD_OUT[4], True),
                                                  (training_combinations()[7], False),
                                                  (training_combinations()[50], False)] for layout in LAYOUTS]
FULL_SET_MIN_ACCURACY = 0.75
FULL_SET_MIN_POSITION = 0.85


@pytest.fixture(scope="module")
def model():
    return sd.load_checkpoint(device="cpu")


@pytest.fixture(scope="module")
def judge():
    return load_classifier(check=False)


def test_default_model_is_small_and_loads_without_arguments(model):
    assert DEFAULT_MODEL.stat().st_size < 20e6
    assert (DEFAULT_MODEL.parent / (DEFAULT_MODEL.stem + "_tokenizer") / "vocab.json").is_file()
    assert model.tokenizer.decode(model.tokenizer.encode("a red circle on a blue background")) == \
        "a red circle on a blue background"


def test_attribute_classifier_is_right_on_real_images_about_every_attribute(judge):
    accuracy = classifier_accuracy(judge)
    assert all(accuracy[name] >= CLASSIFIER_MIN_ACCURACY for name in ATTRIBUTE_NAMES), accuracy


def test_default_model_draws_the_prompted_shape_color_and_background(model, judge):
    r = prompt_accuracy(model, judge, guidance_scale=5.0, num_inference_steps=25, per_prompt=2, seed=1,
                        prompts=SMALL_SET)
    assert r["accuracy"] >= SMALL_SET_MIN_ACCURACY, r
    assert r["held_out"] >= SMALL_SET_MIN_ACCURACY - 0.2, r


def test_default_model_draws_whole_captions_size_and_position_included(model, judge):
    r = prompt_accuracy(model, judge, guidance_scale=5.0, num_inference_steps=25, per_prompt=1, seed=2,
                        prompts=FULL_SET)
    assert r["images"] == 24
    assert r["accuracy"] >= FULL_SET_MIN_ACCURACY, r
    assert r["position"] >= FULL_SET_MIN_POSITION and r["size"] >= FULL_SET_MIN_POSITION, r


def test_evaluation_generates_through_the_models_own_pipeline(model):
    prompt = ["a small red circle on a blue background in the top left"]
    ours = generate(model, prompt, num_inference_steps=5, guidance_scale=3.0, seed=4)
    pipe = model.generate(prompt, num_inference_steps=5, guidance_scale=3.0, seed=4, output_type="pt", progress=False)
    torch.testing.assert_close(ours, pipe.float() * 2 - 1)


def test_generated_images_are_not_dataset_copies_of_one_prompt(model):
    # different prompts give different pictures; the same prompt and seed gives the same picture
    a = generate(model, ["a red circle on a blue background"], num_inference_steps=10, seed=3)
    b = generate(model, ["a red circle on a blue background"], num_inference_steps=10, seed=3)
    c = generate(model, ["a yellow square on a black background"], num_inference_steps=10, seed=3)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.2
    # most pixels are nearest to the palette's blue (background), a good number to its red (the circle)
    palette = torch.tensor([PALETTE[name] for name in COLORS], dtype=torch.float32) / 127.5 - 1    # (6, 3)
    pixels = a[0].reshape(3, -1).T                                                        # (H*W, 3)
    nearest = torch.cdist(pixels, palette).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=len(COLORS))
    assert counts[COLORS.index("blue")] > a[0, 0].numel() / 2, counts
    assert counts[COLORS.index("red")] >= MIN_SHAPE_PIXELS, counts
