"""Every long job says what runs and how far: training stages, the VAE's PSNR, the UNet's encoding, evaluation."""
import contextlib
import io

import pytest
import torch

import sd
import sd.training.evaluation as evaluation
import sd.training.vae as vae_module
from sd.cli import main
from sd.cli.train import default_minutes
from sd.training import STAGES, TrainOptions, read_stage, train_stage
from sd.training.data import ShapesDataset
from sd.training.stages import make_dataset

IMAGE_SIZE = 16          # the tiny preset's images
BUDGET_MINUTES = 0.01    # a time budget (0.6 s), so that the bars count seconds of the budget


def _run_quietly_captured(fn):
    """fn() with stdout and stderr captured: (result, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn()
    return result, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """The three tiny stages on a time budget with progress on: (out folder, runs, stdout, stderr)."""
    out = tmp_path_factory.mktemp("progress")
    data = ShapesDataset(48, image_size=IMAGE_SIZE, seed=0)
    opts = TrainOptions(out_dir=str(out), minutes=BUDGET_MINUTES, batch_size=8, progress=True, device="cpu")
    runs, stdout, stderr = _run_quietly_captured(
        lambda: {stage: train_stage(stage, opts, "tiny", data, IMAGE_SIZE) for stage in STAGES})
    return out, runs, stdout, stderr


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_on_a_time_budget_shows_the_share_spent_and_the_step_and_loss(shown, stage):
    _, runs, _, stderr = shown
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(f"train {stage} ")]
    assert lines, f"no progress bar for {stage}: {stderr[-500:]}"
    assert all(line.startswith(f"train {stage} ({BUDGET_MINUTES:g} min):") for line in lines)
    assert "100%" in lines[-1]                                  # the budget was spent
    assert f"step={runs[stage]['steps']}" in lines[-1] and "loss=" in lines[-1]


def test_vae_psnr_after_training_has_a_bar_and_is_measured_once(shown, tmp_path, monkeypatch):
    out, runs, _, stderr = shown
    assert "VAE reconstruction PSNR on 48 images" in stderr
    assert runs["vae"]["psnr"] == pytest.approx(read_stage(out / "vae.safetensors")[1]["psnr"])
    calls = []
    measure = vae_module.vae_psnr
    monkeypatch.setattr(vae_module, "vae_psnr", lambda *a, **k: calls.append(1) or measure(*a, **k))
    data = ShapesDataset(16, image_size=IMAGE_SIZE, seed=1)
    opts = TrainOptions(out_dir=str(tmp_path), steps=1, batch_size=4, progress=False, device="cpu")
    train_stage("vae", opts, "tiny", data, IMAGE_SIZE)
    assert len(calls) == 1, f"the PSNR was measured {len(calls)} times"


def test_unet_stage_shows_the_encoding_of_the_dataset(shown):
    assert "unet: encoding 48 images with the VAE" in shown[3]


def test_quiet_training_prints_no_bar(tmp_path):
    data = ShapesDataset(16, image_size=IMAGE_SIZE, seed=1)
    opts = TrainOptions(out_dir=str(tmp_path), minutes=BUDGET_MINUTES, batch_size=4, progress=False, device="cpu")
    _, _, stderr = _run_quietly_captured(lambda: train_stage("vae", opts, "tiny", data, IMAGE_SIZE))
    assert stderr == ""


def test_drawing_the_dataset_shows_a_bar_only_when_asked():
    _, _, shown_err = _run_quietly_captured(lambda: make_dataset(IMAGE_SIZE, 30, progress=True))
    assert "drawing 30 train images" in shown_err and "30/30" in shown_err
    _, _, quiet_err = _run_quietly_captured(lambda: make_dataset(IMAGE_SIZE, 30))
    assert quiet_err == ""


def test_evaluation_says_each_run_on_stderr_and_keeps_stdout_for_the_report(shown, monkeypatch):
    out = shown[0]
    model = sd.load_checkpoint(out / "model.safetensors", device="cpu")
    two_prompts = evaluation.prompt_set()[:2]
    monkeypatch.setattr(evaluation, "prompt_set", lambda: two_prompts)
    report, stdout, stderr = _run_quietly_captured(lambda: evaluation.evaluate_model(
        model, num_inference_steps=2, per_prompt=1, generate_defaults=False, progress=True))
    assert stdout == ""
    assert "the attribute classifier on 2,000 real images" in stderr
    assert "run 1 of 2, prompt accuracy guided: 2 images, scale 5, 2 ddim steps" in stderr
    assert "run 2 of 2, prompt accuracy unguided: 2 images, scale 1, 2 ddim steps" in stderr
    assert "sampling (ddim)" in stderr and "2/2" in stderr          # the sampler's bar, to its last step
    assert "VAE reconstruction PSNR on 512 images" in stderr
    assert report["guided"]["images"] == 2 and torch.isfinite(torch.tensor(report["vae_psnr_db"]))


def test_a_single_stage_by_default_trains_for_its_share_of_the_recipe():
    # `train vae`, `train text`, `train unet` one after the other take as long as `train all`
    assert sum(default_minutes(stage) for stage in STAGES) == pytest.approx(default_minutes("all"))
    assert default_minutes("vae") < default_minutes("all")


def test_train_and_evaluate_help_state_how_long_they_take_and_how_to_shorten(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"'all' takes {default_minutes('all'):g} minutes" in text and "--minutes 2" in text
    assert all(f"{stage} {default_minutes(stage):g}" in text for stage in STAGES)
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "about 4 minutes on 2 CPU cores" in text and "--per-prompt 1" in text
