"""The Fréchet distance on the judge's features ranks what it should: real pictures close to real ones (closer with
more pictures), pure noise far, a trained pixel model's samples far closer than an untrained one's."""
from __future__ import annotations

import pytest
import torch

from sd import load_checkpoint
from sd.pixel_unet import IMAGE_SIZE, TinyUNet, cosine_alpha_bar, load_pixel_unet, sample_eps_clipped
from sd.training.data import ATTRIBUTE_NAMES, ShapesDataset
from sd.training.evaluation import (confident_share, format_report, judge_features, load_classifier, prompt_accuracy,
                                    prompt_set, real_pictures, score)
from sd.training.frechet import frechet_distance

N = 192


@pytest.fixture(scope="module")
def judge():
    return load_classifier()


@pytest.fixture(scope="module")
def real_set():
    data = ShapesDataset(length=4 * N + 400, image_size=IMAGE_SIZE, seed=1)
    large = torch.tensor([a.size == "large" for a in data.attributes])
    return data.pixels(slice(None))[large]


def ddim_samples(model, n: int, steps: int = 16) -> torch.Tensor:
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    return sample_eps_clipped(model, x, steps, cosine_alpha_bar())


def test_real_pictures_are_close_to_real_ones_and_closer_with_more_of_them(judge, real_set):
    features = judge_features(judge, real_set)
    noise = torch.randn(N, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real_small = frechet_distance(features[:N // 2], features[N // 2:N])
    real_large = frechet_distance(features[:2 * N], features[2 * N:4 * N])
    to_noise = frechet_distance(judge_features(judge, noise), features[:N])
    assert real_large < real_small          # the small-sample bias shrinks towards 0
    assert real_small < to_noise / 10       # real against real is far below noise


def test_a_trained_model_is_closer_to_real_than_an_untrained_one(judge, real_set):
    real = judge_features(judge, real_set[:N])
    torch.manual_seed(0)
    untrained = frechet_distance(judge_features(judge, ddim_samples(TinyUNet().eval(), N)), real)
    trained = frechet_distance(judge_features(judge, ddim_samples(load_pixel_unet("eps"), N)), real)
    assert trained < untrained / 2


def test_the_judge_reads_real_pictures_with_confidence_and_few_noises(judge, real_set):
    noise = torch.randn(N, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert confident_share(judge, real_set[:N]) > 0.95
    assert confident_share(judge, noise) < 0.5


def test_evaluations_real_drawings_show_what_their_captions_say(judge):
    keys = [key for key, _ in prompt_set()[:24]]
    pictures = real_pictures(keys, 32, seed=0)
    assert pictures.shape == (24, 3, 32, 32) and -1 <= float(pictures.min()) and float(pictures.max()) <= 1
    assert score(judge, pictures, keys).all(dim=1).float().mean() > 0.95
    # another seed jitters the drawings: the same captions, other pictures
    assert not torch.equal(real_pictures(keys, 32, seed=1), pictures)


def test_the_evaluation_reports_a_frechet_distance_above_its_real_floor(judge):
    model = load_checkpoint()
    r = prompt_accuracy(model, judge, guidance_scale=5.0, num_inference_steps=8, per_prompt=1, seed=0)
    assert 0 < r["frechet_floor"] < r["frechet_distance"]
    assert "Fréchet distance to real drawings" in format_report({
        "classifier_on_real_images": {"all": 1.0, **{n: 1.0 for n in ATTRIBUTE_NAMES}}, "guided": r,
        "vae_psnr_db": 30.0})
