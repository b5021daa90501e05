"""Training that loses nothing: Ctrl-C and SIGTERM save the current step, --resume continues from it or says in one
line why it cannot, and what an interrupted save left behind is removed at the next start."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from sd.training import TrainingInterrupted, TrainOptions, read_stage, train_loop, train_stage
from sd.training.data import ShapesDataset
from sd.training.distributed import rank_and_world
from sd.training.interrupt import sigterm_raises
from sd.training.stage_checkpoint import PARTIAL_SUFFIX

IMAGE_SIZE = 16      # the tiny preset's images
TOY_META = {"toy": {"width": 4}}


def _opts(out, **kw):
    base = dict(out_dir=str(out), steps=6, batch_size=8, lr=1e-2, seed=0, progress=False, checkpoint_every=100,
                device="cpu")
    return TrainOptions(**{**base, **kw})


def _toy_loss(send_at: dict | None = None):
    """A step loss for a 4 -> 1 linear model; sends itself the signal `send_at[step]` during that step."""
    def step_loss(model, step, generator):
        if send_at and step in send_at:
            signal.raise_signal(send_at[step])
        x = torch.randn(8, 4, generator=generator)
        return (model(x) ** 2).mean()
    return step_loss


def _toy_train(out, send_at=None, meta=TOY_META, name="toy", **kw):
    torch.manual_seed(0)
    return train_loop(name, nn.Linear(4, 1), _toy_loss(send_at), _opts(out, **kw), meta)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_it_interrupted_and_restores_the_handlers(tmp_path, signum):
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=rf"{signal.Signals(signum).name} stopped toy at step 3; saved") as e:
        _toy_train(tmp_path, send_at={2: signum})           # the signal arrives during step 2 (the third)
    assert e.value.signum == signum
    _, meta = read_stage(tmp_path / "toy.safetensors")     # no periodic save before (checkpoint_every=100)
    assert meta["step"] == 3 and len(meta["losses"]) == 3
    assert signal.getsignal(signum) is before


def test_resume_after_a_signal_matches_an_uninterrupted_run(tmp_path):
    whole = _toy_train(tmp_path / "a")
    with pytest.raises(TrainingInterrupted):
        _toy_train(tmp_path / "b", send_at={1: signal.SIGTERM})
    resumed = _toy_train(tmp_path / "b", resume=True)
    assert resumed["steps"] == 6 and resumed["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    torch.testing.assert_close(resumed["model"].weight, whole["model"].weight)


def test_resume_without_a_checkpoint_starts_at_step_0_and_says_so(tmp_path, capsys):
    run = _toy_train(tmp_path, resume=True)
    assert run["steps"] == 6
    assert f"--resume: no checkpoint at {tmp_path / 'toy.safetensors'} yet, training toy from step 0" in \
        capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "is not a readable safetensors file (0 bytes: empty or truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "is not a readable safetensors file (200 bytes"),
])
def test_resume_from_an_empty_or_truncated_checkpoint_says_so_in_one_line(tmp_path, damage, message):
    _toy_train(tmp_path, steps=2)
    damage(tmp_path / "toy.safetensors")
    with pytest.raises(ValueError) as e:
        _toy_train(tmp_path, resume=True)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_resume_refuses_another_stages_checkpoint(tmp_path):
    _toy_train(tmp_path, steps=2, name="other")
    (tmp_path / "other.safetensors").rename(tmp_path / "toy.safetensors")
    with pytest.raises(ValueError, match="cannot resume toy from .*: it is the checkpoint of the 'other' stage"):
        _toy_train(tmp_path, resume=True)


def test_resume_refuses_other_model_sizes(tmp_path):
    _toy_train(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"other model sizes \(toy.width 4 there, 8 in this run\); .*--preset"):
        _toy_train(tmp_path, resume=True, meta={"toy": {"width": 8}})


def test_resume_with_another_preset_says_so_before_training(tmp_path):
    data = ShapesDataset(32, image_size=IMAGE_SIZE, seed=0)
    train_stage("vae", _opts(tmp_path, steps=1, lr=None), "tiny", data, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"cannot resume vae .*: it holds other model sizes \(vae.block_channels "
                                         r"\[8, 16\] there, \[32, 64, 64\] in this run\); was it trained with another "
                                         r"--preset\?"):
        train_stage("vae", _opts(tmp_path, steps=2, lr=None, resume=True), "small", data, IMAGE_SIZE)


def test_a_partial_save_left_by_an_interruption_is_removed_at_the_next_start(tmp_path, capsys):
    partial = tmp_path / f"toy.safetensors{PARTIAL_SUFFIX}"
    partial.write_bytes(b"half a checkpoint")
    _toy_train(tmp_path, steps=1)
    assert not partial.exists() and (tmp_path / "toy.safetensors").is_file()
    assert f"removed {partial}, left by an interrupted save" in capsys.readouterr().out


def test_options_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="lr must be positive, got -1"):
        TrainOptions(steps=1, lr=-1)
    with pytest.raises(ValueError, match="lr and batch_size must be set"):
        train_loop("toy", nn.Linear(4, 1), _toy_loss(), _opts(tmp_path / "run", lr=None), TOY_META)
    assert not (tmp_path / "run").exists()


def test_asking_for_the_rank_starts_no_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="call sd.training.init_distributed"):
        rank_and_world()
    assert not torch.distributed.is_initialized()


def _train_command(out, *extra):
    return [sys.executable, "-m", "sd", "train", "vae", "--preset", "tiny", "--image-size", str(IMAGE_SIZE),
            "--dataset-size", "64", "--batch-size", "8", "--device", "cpu", "--threads", "1", "--out", str(out),
            "--quiet", *extra]


def test_sigterm_saves_a_checkpoint_and_resume_continues_from_that_step(tmp_path):
    """`python -m sd train`, sent SIGTERM mid-run: exit 143 with one line, then --resume picks up the step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / "vae.safetensors"
    proc = subprocess.Popen(_train_command(tmp_path, "--steps", "100000", "--checkpoint-every", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)          # the first periodic checkpoint: the loop is running
    assert ckpt.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("python -m sd train: error: SIGTERM stopped vae at step")
    stopped = int(line.split("at step ")[1].split(";")[0])
    _, meta = read_stage(ckpt)
    assert meta["step"] == stopped == len(meta["losses"]) and stopped >= 2

    result = subprocess.run(_train_command(tmp_path, "--steps", str(stopped + 2), "--resume"),
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming vae from step {stopped}" in result.stdout
    _, resumed = read_stage(ckpt)
    assert resumed["step"] == stopped + 2 and resumed["losses"][:stopped] == meta["losses"]


def test_sigterm_outside_the_steps_raises_a_one_line_interruption():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM outside the training steps") as e:
        with sigterm_raises():
            signal.raise_signal(signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
