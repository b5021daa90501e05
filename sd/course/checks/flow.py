"""Checks for notebook 13 (flow matching): the conditional flow-matching loss, the Euler sampler of the flow ODE,
and the conversion of a velocity into the clean sample and the noise.

The references are `sd.flow_matching` (tested against diffusers' FlowMatchEulerDiscreteScheduler in
tests/test_flow_matching.py). The `Mistake`s recompute them the typical wrong ways (the velocity's sign, the path
run backwards, the times drawn after the noise, the step evaluated at the next time, ...).
"""
from __future__ import annotations

import torch
from torch import nn

from ...flow_matching import flow_matching_loss, sample_flow_euler
from .common import Case, Mistake, _kind, _unknown_mistake, check_function, randn, seeded

# The 2D points of the notebook: (B, 2); a small model is enough to see the gradients.
POINT_DIM = 2


class _TinyVelocity(nn.Module):
    """v(x, t) = W [x, t] + b: a model with parameters, to check that the loss reaches them."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(POINT_DIM + 1, POINT_DIM)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, t.view(-1, 1)], dim=1))


class _TinyPixelVelocity(nn.Module):
    """v(x, t) for pictures (B, C, H, W): a 1 x 1 convolution of x plus a per-channel multiple of t."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.mix = nn.Conv2d(channels, channels, 1)
        self.time = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + t.view(-1, 1, 1, 1) * self.time.view(1, -1, 1, 1)


def _reference_loss(model, x0, seed):
    return flow_matching_loss(model, x0, torch.Generator().manual_seed(int(seed)), density="uniform")


def _draws(case: Case):
    """t, noise as the exercise draws them: t first, then the noise, from the case's generator."""
    x0, seed = case.inputs["x0"], int(case.inputs["seed"])
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(x0.shape[0], generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return x0, t, noise


def _loss_mistake(kind: str):
    def compute(ref, case):
        model = case.inputs["model"]
        x0, t, noise = _draws(case)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        if kind == "noise_first":
            generator = torch.Generator().manual_seed(int(case.inputs["seed"]))
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.rand(x0.shape[0], generator=generator)
            tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tt) * x0 + tt * noise
        target = noise - x0
        if kind == "sign":
            target = x0 - noise
        elif kind == "eps":
            target = noise
        elif kind == "x0":
            target = x0
        elif kind == "reversed":
            x_t = tt * x0 + (1 - tt) * noise
        elif kind == "sum":
            return ((model(x_t, t) - target) ** 2).sum()
        elif kind == "thousand":
            return ((model(x_t, 1000 * t) - target) ** 2).mean()
        return ((model(x_t, t) - target) ** 2).mean()
    return compute


def _loss_cases() -> list[Case]:
    cases = []
    for i, batch in enumerate((16, 7)):
        with seeded(130 + i):
            model = _TinyVelocity()
            x0 = randn(batch, POINT_DIM) * 2
        cases.append(Case({"model": model, "x0": x0, "seed": 1300 + i}))
    with seeded(132):      # pictures: the same loss for data of any shape after the batch
        cases.append(Case({"model": _TinyPixelVelocity(), "x0": randn(4, 3, 5, 6), "seed": 1302}))
    return cases


def _require_loss_behaviour(fn, exercise: str) -> None:
    """The loss reaches the model's parameters, uses only the given generator, and leaves x0 as it was."""
    with seeded(139):
        model = _TinyVelocity()
        x0 = randn(12, POINT_DIM)
    kept = x0.clone()
    loss = fn(model, x0, torch.Generator().manual_seed(5))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise AssertionError(f"check_flow_matching_loss: the loss should be a single number (a 0-dimensional "
                             f"tensor), got {_kind(loss)}" + _unknown_mistake(exercise))
    if not loss.requires_grad:
        raise AssertionError("check_flow_matching_loss: the loss carries no gradient back to the model: compute it "
                             "from the model's output, without detaching it or leaving the autograd graph"
                             + f'\n  More help: hint("{exercise}")')
    loss.backward()
    if any(p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0
           for p in model.parameters()):
        raise AssertionError("check_flow_matching_loss: the gradient does not reach every parameter of the model: "
                             "the loss must depend on the model's prediction at the noisy points")
    if not torch.equal(x0, kept):
        raise AssertionError("check_flow_matching_loss: your loss changed x0 in place; build new tensors instead")
    torch.manual_seed(1)
    first = fn(model, x0, torch.Generator().manual_seed(5)).item()
    torch.manual_seed(2)
    second = fn(model, x0, torch.Generator().manual_seed(5)).item()
    if first != second:
        raise AssertionError("check_flow_matching_loss: two calls with the same generator gave different losses: "
                             "draw the times and the noise from the generator you are given, not from torch's "
                             "global random numbers")


def check_flow_matching_loss(fn) -> bool:
    """Exercise 13.1: fn(model, x0, generator) -> the mean squared velocity error at random points of the path;
    x0 is (B, ...) of any shape after the batch (2D points, pictures)."""
    exercise = "13.1"
    _require_loss_behaviour(fn, exercise)
    mistakes = [
        Mistake("the target points the wrong way: along the path from data (t = 0) to noise (t = 1) the velocity "
                "is the noise minus the data", _loss_mistake("sign")),
        Mistake("the target is the noise (ε-prediction, as in notebook 10): flow matching regresses the velocity "
                "of the path, the noise minus the data", _loss_mistake("eps")),
        Mistake("the target is the clean data: flow matching regresses the velocity, the noise minus the data",
                _loss_mistake("x0")),
        Mistake("the path runs backwards: at t = 0 it should be the data and at t = 1 the noise, so the data is "
                "weighted by 1 − t", _loss_mistake("reversed")),
        Mistake("the noise is drawn before the times: draw one time per sample first, then the noise, both from "
                "the generator, so that the draws match the reference's", _loss_mistake("noise_first")),
        Mistake("the squared errors are summed: take their mean over every number of the batch",
                _loss_mistake("sum")),
        Mistake("the model is given the time times 1000: here the time is the path's own t, in [0, 1]",
                _loss_mistake("thousand")),
    ]
    return check_function("check_flow_matching_loss", lambda model, x0, seed: fn(
                              model, x0, torch.Generator().manual_seed(int(seed))),
                          _reference_loss, _loss_cases(), mistakes, exercise=exercise,
                          hint="draw a time per sample, then the noise; the point on the straight path; its velocity",
                          reference_name="the conditional flow-matching loss of sd.flow_matching")


# ----------------------------------------------------------------------------------------------------------
# Exercise 13.2: Euler on the flow ODE
# ----------------------------------------------------------------------------------------------------------

def _field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity field that depends on x and on t (B,), so every mistake in the loop shows."""
    target = torch.tensor([1.5, -0.5])
    return (x - target) / (0.4 + t.view(-1, 1)) + 0.3 * torch.sin(3 * x[:, [1, 0]])


def _sampler_mistake(kind: str):
    def compute(ref, case):
        velocity, noise, times = case.inputs.values()
        x = noise.clone()
        n = len(times) - 1
        for i in range(n - 1 if kind == "short" else n):
            t, t_next = times[i], times[i + 1]
            at = t_next if kind == "next" else t
            v = velocity(x, at.expand(x.shape[0]))
            x = x + ((t - t_next) if kind == "sign" else (t_next - t)) * v
        return x
    return compute


def check_flow_sampler(fn) -> bool:
    """Exercise 13.2: fn(velocity, noise, times) -> x at times[-1], by Euler steps from times[0]."""
    with seeded(132):
        cases = [Case({"velocity": _field, "noise": randn(6, POINT_DIM), "times": torch.linspace(1, 0, 5)}),
                 Case({"velocity": _field, "noise": randn(3, POINT_DIM),
                       "times": torch.tensor([1.0, 0.9, 0.6, 0.2, 0.05, 0.0])})]
    mistakes = [
        Mistake("the steps go the wrong way: each moves x by (next time − this time) times the velocity, and the "
                "times fall, so the step is negative", _sampler_mistake("sign")),
        Mistake("the velocity is evaluated at the next time: Euler evaluates it where the step starts",
                _sampler_mistake("next")),
        Mistake("the last step is missing: n + 1 times make n steps, the last one ending at times[-1]",
                _sampler_mistake("short")),
    ]
    return check_function("check_flow_sampler", fn, sample_flow_euler, cases, mistakes, exercise="13.2",
                          hint="one Euler step per pair of neighbouring times, the velocity taken at the first",
                          reference_name="Euler on the flow ODE (sd.flow_matching)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 13.3: from a velocity to the clean sample and the noise
# ----------------------------------------------------------------------------------------------------------

def reference_velocity_to_x0_eps(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor):
    """(x0, eps) from x_t = (1 - t) x0 + t eps and v = eps - x0: x0 = x_t - t v, eps = x_t + (1 - t) v."""
    tt = t.reshape(-1, *([1] * (x_t.dim() - 1)))
    return x_t - tt * v, x_t + (1 - tt) * v


def _conversion_mistake(kind: str):
    def compute(ref, case):
        x_t, v, t = case.inputs.values()
        tt = t.reshape(-1, *([1] * (x_t.dim() - 1)))
        x0, eps = x_t - tt * v, x_t + (1 - tt) * v
        return {"swap": (eps, x0),
                "one_minus": (x_t - (1 - tt) * v, x_t + tt * v),
                "signs": (x_t + tt * v, x_t - (1 - tt) * v)}[kind]
    return compute


def check_velocity_to_x0_eps(fn) -> bool:
    """Exercise 13.3: fn(x_t, v, t) -> (x0, eps) that the point x_t and its velocity v at time t imply."""
    with seeded(133):
        cases = [Case({"x_t": randn(5, POINT_DIM), "v": randn(5, POINT_DIM), "t": torch.rand(5)}),
                 Case({"x_t": randn(2, 4, 3, 3), "v": randn(2, 4, 3, 3), "t": torch.tensor([0.15, 0.85])})]
    mistakes = [
        Mistake("the two outputs are swapped: the clean sample first, then the noise", _conversion_mistake("swap")),
        Mistake("t and 1 − t are exchanged: going back to the data (t = 0) takes t times the velocity, going "
                "forward to the noise (t = 1) takes 1 − t times it", _conversion_mistake("one_minus")),
        Mistake("the signs are flipped: the velocity points from the data to the noise, so the data lies behind "
                "x_t and the noise ahead of it", _conversion_mistake("signs")),
    ]
    return check_function("check_velocity_to_x0_eps", fn, reference_velocity_to_x0_eps, cases, mistakes,
                          exercise="13.3", hint="two equations, two unknowns: the path and its velocity",
                          reference_name="the straight path solved for the data and the noise")

