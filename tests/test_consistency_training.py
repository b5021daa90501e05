"""Latent consistency distillation (sd/training/consistency.py): a few steps run through train_loop, resume gives
the weights of an uninterrupted run, the teacher is never changed, the target gets no gradient, and the LoRA file
loads the way users load LCM-LoRA files."""
from __future__ import annotations

import pytest
import torch

import sd
from sd.adapters.lora import lora_layers
from sd.training.consistency import (ConsistencyDistillation, consistency_distillation_loss, consistency_function,
                                     distill_lcm, lcm_lora_from_checkpoint, lcm_lora_student,
                                     skipping_timesteps)
from sd.training.loop import TrainOptions

TINY = dict(batch_size=4, lr=1e-3, progress=False, checkpoint_every=1000)


@pytest.fixture(scope="module")
def pipe():
    return sd.load_checkpoint(device="cpu")


def test_the_boundary_condition_returns_x_at_timestep_zero():
    alphas_cumprod = sd.DiffusionScheduler().alphas_cumprod
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = consistency_function(x, eps, torch.tensor([0, 0]), alphas_cumprod)
    torch.testing.assert_close(out, x)
    far = consistency_function(x, eps, torch.tensor([999, 999]), alphas_cumprod)
    x0 = (x - (1 - alphas_cumprod[999]) ** 0.5 * eps) / alphas_cumprod[999] ** 0.5
    torch.testing.assert_close(far, x0, atol=1e-4, rtol=1e-4)      # c_skip < 1e-5 far from the data


def test_skipping_timesteps_are_lcm_s_fifty_and_twenty_below():
    t, t_prev = skipping_timesteps(5000, 1000, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(19, 1000, 20))               # all 50 DDIM timesteps, and only them
    assert torch.equal(t_prev, (t - 20).clamp(min=0))
    assert t_prev.min() == 0


def test_the_loss_trains_the_student_and_no_gradient_reaches_the_target_or_the_teacher(pipe):
    teacher = pipe.unet
    distillation = ConsistencyDistillation(lcm_lora_student(teacher, rank=2))
    student, target = distillation.student, distillation.target
    teacher.requires_grad_(True)                                         # so a leak would show
    target.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        z0 = torch.randn(3, 4, 8, 8)
        context = torch.randn(3, 77, pipe.unet.config.context_dim)
        uncond = torch.randn(1, 77, pipe.unet.config.context_dim)
        # a student that differs from the teacher: B of every LoRA away from zero
        with torch.no_grad():
            for layer in lora_layers(student).values():
                layer.lora_B.weight.normal_(0, 0.01)
        loss = consistency_distillation_loss(student, target, teacher, z0, context, uncond, g,
                                             pipe.scheduler.alphas_cumprod)
        loss.backward()
        trained = [p for p in student.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        assert all(p.grad is None for p in target.parameters())
        assert all(p.grad is None for p in teacher.parameters())
    finally:
        teacher.requires_grad_(False)
        teacher.zero_grad(set_to_none=True)


def test_the_target_moves_towards_the_student_by_the_ema_decay():
    student = torch.nn.Linear(2, 2)
    distillation = ConsistencyDistillation(student)
    before = distillation.target.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    distillation.update_target(0.95)
    torch.testing.assert_close(distillation.target.weight, before + 0.05)
    assert not distillation.target.weight.requires_grad


def test_a_few_steps_train_the_lora_leave_the_teacher_and_write_a_file_users_can_load(pipe, tmp_path):
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    run = distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path), steps=3, **TINY), rank=2, dataset_size=16)
    assert run["steps"] == 3 and len(run["losses"]) == 3 and all(l > 0 for l in run["losses"])
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())   # teacher unchanged
    assert (tmp_path / "lcm.safetensors").is_file()
    user = sd.load_checkpoint(device="cpu")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, user.unet.config.context_dim)
    plain = user.unet(x, ctx, 500)
    counts = user.load_lora_weights(run["lora_path"])
    assert counts["unet"] == len(lora_layers(run["student"])) > 0
    assert not torch.allclose(user.unet(x, ctx, 500), plain)            # trained: B moved off zero
    torch.testing.assert_close(user.unet(x, ctx, 500), run["student"](x, ctx, 500), atol=2e-3, rtol=2e-3)  # fp16 file
    again = lcm_lora_from_checkpoint(tmp_path / "lcm.safetensors", tmp_path / "again.safetensors")
    other = sd.load_checkpoint(device="cpu")
    other.load_lora_weights(again)                                      # the same LoRA, from the stage checkpoint
    torch.testing.assert_close(other.unet(x, ctx, 500), user.unet(x, ctx, 500))


def test_resume_gives_the_weights_of_an_uninterrupted_run(pipe, tmp_path):
    straight = distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path / "a"), steps=4, **TINY), rank=2, dataset_size=16)
    distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path / "b"), steps=2, **TINY), rank=2, dataset_size=16)
    resumed = distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path / "b"), steps=4, resume=True, **TINY), rank=2,
                          dataset_size=16)
    assert resumed["steps"] == 4 and resumed["losses"][:2] == straight["losses"][:2]
    ours, theirs = resumed["model"].state_dict(), straight["model"].state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:                                     # the student's LoRA and the EMA target alike
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)


def test_bad_arguments_are_refused_in_one_line_before_any_work(pipe, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path), steps=1, **TINY), rank=0)
    with pytest.raises(ValueError, match="target_decay"):
        distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path), steps=1, **TINY), target_decay=1.5)
    with pytest.raises(TypeError, match="loss must be callable"):
        distill_lcm(pipe, TrainOptions(out_dir=str(tmp_path), steps=1, **TINY), loss="mse")
    assert not any(tmp_path.iterdir())
