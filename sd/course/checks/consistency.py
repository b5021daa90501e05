"""Checks for notebook 16 (consistency models and their distillation): the consistency function with LCM's
boundary conditions, the latent consistency distillation loss, and multistep consistency sampling.

The references are `sd.training.consistency` (the loss and the parametrisation the shipped LCM-LoRA was trained
with) and `sd.samplers.sample_lcm` (tested against diffusers' LCMScheduler in tests/test_lcm.py). The `Mistake`s
recompute them the typical wrong ways (no timestep scaling, c_skip and c_out exchanged, the student as its own
target, the teacher unguided, the target asked at the wrong timestep, noise after the last step, ...).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...diffusion import DiffusionScheduler
from ...samplers import (NoiseLevels, SIGMA_DATA, consistency_scalings, predict_x0, q_sample, sample_lcm,
                         sigma_of)
from ...training.consistency import (GUIDANCE_RANGE, consistency_distillation_loss, consistency_function,
                                     skipping_timesteps)
from .common import Case, Mistake, _kind, _unknown_mistake, check_function, randn, seeded

LATENT_CHANNELS, CONTEXT_DIM, CONTEXT_TOKENS = 4, 8, 3


def _alphas_cumprod() -> torch.Tensor:
    return DiffusionScheduler().alphas_cumprod.clone()


class _TinyEpsModel(nn.Module):
    """eps(x, context, t) for (B, 4, h, w) latents: a 1 x 1 convolution of x, plus the text and the timestep per
    channel, so that every input shows in the output and every parameter gets a gradient."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.text = nn.Linear(CONTEXT_DIM, LATENT_CHANNELS)
        self.time = nn.Parameter(torch.randn(LATENT_CHANNELS))

    def forward(self, x: torch.Tensor, context: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000     # () or (B,) -> (B or 1, 1, 1, 1)
        text = self.text(context.mean(dim=1))[:, :, None, None]              # (B, T, D) -> (B, C, 1, 1)
        return self.mix(x) + text + t * self.time.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Exercise 16.1: the consistency function
# ----------------------------------------------------------------------------------------------------------

def _function_mistake(kind: str):
    def compute(ref, case):
        x_t, eps, t, alphas_cumprod = case.inputs.values()
        s = t.float() * (1.0 if kind == "unscaled" else 10.0)
        c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
        c_out = s / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
        if kind == "no_sqrt":
            c_out = s / (s ** 2 + SIGMA_DATA ** 2)
        if kind == "swapped":
            c_skip, c_out = c_out, c_skip
        c_skip, c_out = c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)
        x0 = predict_x0(x_t, eps, alphas_cumprod[t].view(-1, 1, 1, 1))
        if kind == "eps":
            return c_skip * x_t + c_out * eps
        if kind == "x0_only":
            return x0
        return c_skip * x_t + c_out * x0
    return compute


def check_consistency_function(fn) -> bool:
    """Exercise 16.1: fn(x_t, eps, t, alphas_cumprod) -> f(x_t, t) = c_skip x_t + c_out x0_hat; t is (B,)."""
    alphas_cumprod = _alphas_cumprod()
    with seeded(161):
        cases = [Case({"x_t": randn(5, 4, 3, 3), "eps": randn(5, 4, 3, 3),
                       "t": torch.tensor([0, 1, 3, 19, 999]), "alphas_cumprod": alphas_cumprod}),
                 Case({"x_t": randn(3, 4, 2, 2), "eps": randn(3, 4, 2, 2), "t": torch.tensor([0, 0, 2]),
                       "alphas_cumprod": alphas_cumprod})]
    mistakes = [
        Mistake("the timestep is not scaled: LCM's boundary conditions see s = 10 t (the timestep scaling), "
                "so that c_skip has fallen to almost 0 by the first timestep it samples",
                _function_mistake("unscaled")),
        Mistake("c_skip and c_out are exchanged: at t = 0 the function must give back x itself, so the weight on "
                "x_t is the one that is 1 there", _function_mistake("swapped")),
        Mistake("c_out lacks its square root: c_out = s over the square root of s² + σ_data², so that it tends "
                "to 1 for large s", _function_mistake("no_sqrt")),
        Mistake("the second term weights the predicted noise: the consistency function mixes x_t with the "
                "predicted clean latent x̂₀, computed from the noise", _function_mistake("eps")),
        Mistake("this is the predicted clean latent alone: it breaks the boundary condition, since at t = 0 the "
                "function must give back x_t exactly", _function_mistake("x0_only")),
    ]
    return check_function("check_consistency_function", fn, consistency_function, cases, mistakes,
                          exercise="16.1", reference_name="LCM's consistency function (sd.training.consistency)",
                          hint="the two weights from s = 10 t and σ_data = 0.5, one for x_t and one for the "
                               "predicted clean latent, each reshaped to one value per sample")


# ----------------------------------------------------------------------------------------------------------
# Exercise 16.2: the distillation loss
# ----------------------------------------------------------------------------------------------------------

def _models(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(student, target, teacher): three different tiny models, all with trainable parameters, so that a
    gradient that reaches the target or the teacher shows."""
    with seeded(seed):
        student = _TinyEpsModel()
        target = copy.deepcopy(student)
        with torch.no_grad():
            for p in target.parameters():
                p.add_(0.3 * torch.randn_like(p))          # an EMA that has not caught up with the student
        teacher = _TinyEpsModel()
    return student, target, teacher


def _loss_mistake(kind: str):
    def compute(ref, case):
        student, target, teacher, z0, context, uncond, seed, alphas_cumprod = case.inputs.values()
        b = z0.shape[0]
        generator = torch.Generator().manual_seed(int(seed))
        if kind == "noise_first":
            noise = torch.randn(z0.shape, generator=generator)
            t, t_prev = skipping_timesteps(b, len(alphas_cumprod), generator)
        else:
            t, t_prev = skipping_timesteps(b, len(alphas_cumprod), generator)
            noise = torch.randn(z0.shape, generator=generator)
        low, high = GUIDANCE_RANGE
        w = (low + (high - low) * torch.rand(b, generator=generator)).view(-1, 1, 1, 1)
        x_t = q_sample(z0, noise, alphas_cumprod[t].view(-1, 1, 1, 1))
        u = uncond.expand(b, -1, -1)
        eps_c, eps_u = teacher(x_t, context, t), teacher(x_t, u, t)
        eps = {"unguided": eps_c, "cond_plus": eps_c + w * (eps_c - eps_u)}.get(kind, eps_u + w * (eps_c - eps_u))
        a_prev = alphas_cumprod[t_prev].view(-1, 1, 1, 1)
        x_prev = a_prev ** 0.5 * predict_x0(x_t, eps, alphas_cumprod[t].view(-1, 1, 1, 1)) + (1 - a_prev) ** 0.5 * eps
        if kind == "no_teacher_step":
            x_prev = x_t
        target_net = {"student_target": student, "teacher_target": teacher}.get(kind, target)
        t_target = t if kind == "target_at_t" else t_prev
        wanted = consistency_function(x_prev, target_net(x_prev, context, t_target), t_target, alphas_cumprod)
        got = consistency_function(x_t, student(x_t, context, t), t, alphas_cumprod)
        if kind == "sum":
            return ((got - wanted) ** 2).sum()
        return ((got - wanted) ** 2).mean()
    return compute


def _loss_cases() -> list[Case]:
    alphas_cumprod = _alphas_cumprod()
    cases = []
    for i, batch in enumerate((6, 3)):
        student, target, teacher = _models(162 + i)
        with seeded(1620 + i):
            z0, context, uncond = (randn(batch, LATENT_CHANNELS, 3, 3), randn(batch, CONTEXT_TOKENS, CONTEXT_DIM),
                                   randn(1, CONTEXT_TOKENS, CONTEXT_DIM))
        cases.append(Case({"student": student, "target": target, "teacher": teacher, "z0": z0, "context": context,
                           "uncond": uncond, "seed": 16200 + i, "alphas_cumprod": alphas_cumprod}))
    return cases


def _reference_loss(student, target, teacher, z0, context, uncond, seed, alphas_cumprod):
    return consistency_distillation_loss(student, target, teacher, z0, context, uncond,
                                         torch.Generator().manual_seed(int(seed)), alphas_cumprod)


def _require_loss_behaviour(fn, exercise: str) -> None:
    """A scalar that reaches the student's parameters and neither the target's nor the teacher's; only the given
    generator's random numbers; z0 left as it was."""
    name = "check_consistency_loss"
    student, target, teacher = _models(169)
    with seeded(1690):
        z0, context, uncond = randn(4, LATENT_CHANNELS, 3, 3), randn(4, CONTEXT_TOKENS, CONTEXT_DIM), \
            randn(1, CONTEXT_TOKENS, CONTEXT_DIM)
    kept = z0.clone()
    loss = fn(student, target, teacher, z0, context, uncond, torch.Generator().manual_seed(5), _alphas_cumprod())
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise AssertionError(f"{name}: the loss should be a single number (a 0-dimensional tensor), got "
                             f"{_kind(loss)}" + _unknown_mistake(exercise))
    if not loss.requires_grad:
        raise AssertionError(f"{name}: the loss carries no gradient back to the student: compute the student's "
                             f"prediction with gradients on" + f'\n  More help: hint("{exercise}")')
    loss.backward()
    if any(p.grad is None or float(p.grad.abs().sum()) == 0 for p in student.parameters()):
        raise AssertionError(f"{name}: the gradient does not reach every parameter of the student: the loss must "
                             f"depend on the student's prediction at the noisier timestep")
    for who, model in (("target", target), ("teacher", teacher)):
        if any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters()):
            raise AssertionError(f"{name}: a gradient reached the {who}: the {who}'s prediction is a fixed goal "
                                 f"(stop-gradient); compute it without tracking gradients")
    if not torch.equal(z0, kept):
        raise AssertionError(f"{name}: your loss changed z0 in place; build new tensors instead")
    torch.manual_seed(1)
    first = fn(student, target, teacher, z0, context, uncond, torch.Generator().manual_seed(5), _alphas_cumprod())
    torch.manual_seed(2)
    second = fn(student, target, teacher, z0, context, uncond, torch.Generator().manual_seed(5), _alphas_cumprod())
    if first.item() != second.item():
        raise AssertionError(f"{name}: two calls with the same generator gave different losses: draw the "
                             f"timesteps, the noise and the guidance scales from the generator you are given, not "
                             f"from torch's global random numbers")


def check_consistency_loss(fn) -> bool:
    """Exercise 16.2: fn(student, target, teacher, z0, context, uncond, generator, alphas_cumprod) -> the mean
    squared distance between the student's f at t_{n+k} and the EMA target's f at t_n, one guided DDIM step of the
    teacher apart."""
    exercise = "16.2"
    _require_loss_behaviour(fn, exercise)
    mistakes = [
        Mistake("the student is its own target: the goal at t_n comes from the target network, the slowly moving "
                "average of the student", _loss_mistake("student_target")),
        Mistake("the teacher gives the goal: the teacher only takes the one ODE step from t_{n+k} to t_n; the "
                "consistency function at t_n is the target network's", _loss_mistake("teacher_target")),
        Mistake("the target is asked at t_{n+k}: after the teacher's step the point lies at the less noisy "
                "timestep t_n, and the target is evaluated there", _loss_mistake("target_at_t")),
        Mistake("the teacher is not guided: its noise is the unconditional prediction plus the guidance scale "
                "times the difference between the conditional and the unconditional ones", _loss_mistake("unguided")),
        Mistake("the guidance starts from the conditional prediction: this course's form starts from the "
                "unconditional one, plus the scale times the difference", _loss_mistake("cond_plus")),
        Mistake("the teacher takes no step: the target must see the point one DDIM step closer to the data",
                _loss_mistake("no_teacher_step")),
        Mistake("the noise is drawn before the timesteps: draw the timesteps first, then the noise, then the "
                "guidance scales, all from the generator", _loss_mistake("noise_first")),
        Mistake("the squared differences are summed: take their mean over every number of the batch",
                _loss_mistake("sum")),
    ]
    return check_function("check_consistency_loss", lambda *args: fn(
                              *args[:6], torch.Generator().manual_seed(int(args[6])), args[7]),
                          _reference_loss, _loss_cases(), mistakes, exercise=exercise,
                          reference_name="the latent consistency distillation loss (sd.training.consistency)",
                          hint="timesteps, noise, guidance scales; the noisy latent; the teacher's one guided step; "
                               "the target's consistency function there; the student's at the noisier point")


# ----------------------------------------------------------------------------------------------------------
# Exercise 16.3: multistep consistency sampling
# ----------------------------------------------------------------------------------------------------------

def reference_consistency_sampling(predict_noise, x: torch.Tensor, timesteps: torch.Tensor,
                                   alphas_cumprod: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """sd.samplers.sample_lcm on the given timesteps (its last level is the clean latent)."""
    alpha_bars = torch.cat([alphas_cumprod[timesteps], torch.ones(1)])
    return sample_lcm(predict_noise, x, NoiseLevels(timesteps, alpha_bars, sigma_of(alpha_bars)), generator=generator)


def _noise_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A noise prediction that depends on x and on t, so that every mistake of the loop shows."""
    return 0.6 * x + 0.4 * torch.sin(2 * x) * (t.float() / 1000) + 0.1


def _sampler_mistake(kind: str):
    def compute(ref, case):
        predict_noise, x, timesteps, seed, alphas_cumprod = case.inputs.values()
        generator = torch.Generator().manual_seed(int(seed))
        n = len(timesteps)
        for i in range(n):
            t = timesteps[i]
            eps = predict_noise(x, t)
            c_skip, c_out = consistency_scalings(t)
            denoised = c_skip * x + c_out * predict_x0(x, eps, alphas_cumprod[t])
            if i < n - 1:
                a_next = alphas_cumprod[timesteps[i + 1]]
                if kind == "same_t":
                    a_next = alphas_cumprod[t]
                if kind == "ddim":
                    x = q_sample(denoised, eps, a_next)
                else:
                    x = q_sample(denoised, torch.randn(x.shape, generator=generator), a_next)
            elif kind != "keep_noisy":
                x = denoised
        return x
    return compute


def check_consistency_sampler(fn) -> bool:
    """Exercise 16.3: fn(predict_noise, x, timesteps, alphas_cumprod, generator) -> the clean latent after one
    consistency jump per timestep, re-noised with fresh noise to the next timestep in between."""
    alphas_cumprod = _alphas_cumprod()
    with seeded(163):
        cases = [Case({"predict_noise": _noise_field, "x": randn(3, 4, 2, 2),
                       "timesteps": torch.tensor([999, 759, 499, 259]), "seed": 1630,
                       "alphas_cumprod": alphas_cumprod}),
                 Case({"predict_noise": _noise_field, "x": randn(2, 4, 3, 3),
                       "timesteps": torch.tensor([499, 199, 19]), "seed": 1631, "alphas_cumprod": alphas_cumprod}),
                 Case({"predict_noise": _noise_field, "x": randn(2, 4, 2, 2),
                       "timesteps": torch.tensor([999]), "seed": 1632, "alphas_cumprod": alphas_cumprod})]
    mistakes = [
        Mistake("the last jump is missing from the result: after the last timestep, the result is its clean estimate, "
                "not the noisy latent the step started from", _sampler_mistake("keep_noisy")),
        Mistake("each estimate is noised back to the timestep it came from: noise it to the NEXT timestep of "
                "the run", _sampler_mistake("same_t")),
        Mistake("the predicted noise is reused to go to the next timestep (a DDIM step): consistency sampling "
                "draws fresh noise from the generator at every step but the last", _sampler_mistake("ddim")),
    ]
    return check_function("check_consistency_sampler", lambda p, x, ts, seed, ac: fn(
                              p, x, ts, ac, torch.Generator().manual_seed(int(seed))),
                          lambda p, x, ts, seed, ac: reference_consistency_sampling(
                              p, x, ts, ac, torch.Generator().manual_seed(int(seed))),
                          cases, mistakes, exercise="16.3",
                          reference_name="multistep consistency sampling (sd.samplers, LCM)",
                          hint="per timestep: the noise prediction, the consistency function, then, unless it is "
                               "the last, fresh noise to the next timestep")
