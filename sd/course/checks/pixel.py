"""Checks for the pixel-diffusion notebook: the training loss of a pixel denoiser, and DDPM's sampling loop.

Both exercises draw random numbers, so both take a `torch.Generator`: the check runs the learner's function and
the reference with generators seeded alike and compares the results (for the loss, also the gradients it sends
into the model's weights). The model is a small stand-in with the notebook's call, model(x_t, t) -> eps, linear
in x_t, so every coefficient shows in the numbers. The references are written here, after Ho et al. 2020,
Algorithms 1 and 2, with the clipping of the predicted x_0 to [-1, 1] that their code does
(tests/test_checks_pixel.py compares them with diffusers' DDPMScheduler). The `Mistake`s recompute them the typical wrong ways (x_0 as the target, alpha_t where alpha_bar_t belongs, a missing square
root, x_0 not clipped, t off by one, ...), so a wrong answer is named, not just reported.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...timestep_embedding import timestep_embedding
from .common import ATOL, RTOL, Case, Mistake, _crash_line, _unknown_mistake, randn, require_callable, seeded

_PREDICTOR_SEED = 3
_TIME_FEATURES = 16
# Gradients are sums over every pixel of the batch: compare them relative to their largest entry.
_GRAD_RTOL = 1e-3
_GRAD_ATOL_FRACTION = 1e-5
# Ho et al. 2020, sec. 4: the pixel-space schedule, linear betas from 1e-4 to 0.02 over T = 1000 steps.
DDPM_BETA_START, DDPM_BETA_END, DDPM_T = 1e-4, 0.02, 1000


def linear_betas(num_train_timesteps: int = DDPM_T, beta_start: float = DDPM_BETA_START,
                 beta_end: float = DDPM_BETA_END) -> torch.Tensor:
    """Ho et al.'s linear schedule, rescaled to num_train_timesteps steps (the same total noise), float32 (T,)."""
    scale = DDPM_T / num_train_timesteps
    if beta_end * scale >= 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} is too few for betas up to {beta_end} "
                         f"per {DDPM_T} steps (a beta would reach 1); use at least {int(DDPM_T * beta_end) + 1}")
    return torch.linspace(beta_start * scale, beta_end * scale, num_train_timesteps, dtype=torch.float32)


def run_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """num_steps timesteps from T - 1 down to 0, evenly spaced (all of them when num_steps = T), int64."""
    return torch.linspace(num_train_timesteps - 1, 0, num_steps).round().long()


class _PixelPredictor(nn.Module):
    """A stand-in for the pixel denoiser with its call, model(x_t, t) -> eps of x_t's shape, linear in x_t.

    Its main term sqrt(1 - alpha_bar_t) x_t is the best guess of the noise when the images are N(0, I), so a
    sampling run stays of order 1; a small convolution and a term in t make every input matter. A real network
    would do, but its normalisations make it almost blind to the scale of x_t, so a missing square root would
    change the numbers too little to tell.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, channels: int = 3):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(_TIME_FEATURES, channels)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).expand(x_t.shape[0])                                   # (B,)
        time = self.time_proj(timestep_embedding(t.float(), _TIME_FEATURES))          # (B, 16) -> (B, C)
        best = (1 - self.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * x_t           # (B, C, H, W)
        return best + 0.1 * (self.conv(x_t) + time[:, :, None, None])


def _build_predictor(betas: torch.Tensor) -> _PixelPredictor:
    with seeded(_PREDICTOR_SEED):
        return _PixelPredictor(torch.cumprod(1 - betas, dim=0))


class _Failed(Exception):
    """The learner's function returned something the check cannot compare; the message says what."""


def _hint_line(hint: str | None) -> str:
    return f"\n  Hint: {hint}" if hint else ""


def _same(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=rtol))


def _run_check(name: str, fn: Callable, reference: Callable, cases: list[Case], run: Callable,
               compare: Callable, mistakes: list[Mistake], hint: str, ref_name: str, describe: Callable,
               exercise: str, behaviour: Callable | None = None) -> bool:
    """Run `run(fn, case)` and `run(reference, case)` on each case; raise AssertionError naming the first mistake.

    `hint` (words, never code) is said when no `Mistake` explains a difference, with a pointer to hint(exercise);
    `behaviour(fn, case)` may raise _Failed for what values alone cannot show (a global random number, say).
    """
    require_callable(name, fn)
    more = f'\n  More help, one step at a time: hint("{exercise}")'
    worst = 0.0
    with torch.random.fork_rng(devices=[]):
        for i, case in enumerate(cases):
            where = f"{name} failed on random input {i + 1} of {len(cases)} ({describe(case)})"
            expected = run(reference, case)
            try:
                got = run(fn, case)
                if behaviour is not None:
                    behaviour(fn, case)
            except NotImplementedError:
                raise
            except _Failed as e:
                raise AssertionError(f"{where}: {e}{more}") from None
            except Exception as e:
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                     + _hint_line(hint) + more) from e
            problem, diff = compare(got, expected)
            if problem is not None:
                named = next((m.hint for m in mistakes if _matches(m, got, case, compare)), None)
                raise AssertionError(f"{where}:\n  {problem}" + (_hint_line(named) if named else
                                     _hint_line(hint) + _unknown_mistake(exercise)))
            worst = max(worst, diff)
    print(f"✅ {name} passed: matches {ref_name} on {len(cases)} random inputs (max diff {worst:.1g})")
    return True


def _matches(mistake: Mistake, got: Any, case: Case, compare: Callable) -> bool:
    try:
        wrong = mistake.compute(None, case)
    except Exception:
        return False   # this mistake cannot happen with this input (e.g. an index past the end)
    return compare(got, wrong)[0] is None


# ----------------------------------------------------------------------------------------------------------
# Exercise: the training loss (Ho et al. 2020, Algorithm 1)
# ----------------------------------------------------------------------------------------------------------

def reference_pixel_loss(model, x0: torch.Tensor, betas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ho et al.'s L_simple on one batch: noise x0 to a random t, predict the noise, mean squared error."""
    return _wrong_loss(model, x0, betas, generator)


def _wrong_loss(model, x0, betas, generator, *, target: str = "noise", schedule: str = "cumprod",
                coef: str = "right", t_range: str = "right", noise_first: bool = False, one_t: bool = False,
                reduction: str = "mean"):
    """The loss with one thing done a chosen wrong way (the defaults are the right way)."""
    b, n = x0.shape[0], len(betas)
    alphas = 1 - betas
    alpha_bar = {"cumprod": torch.cumprod(alphas, dim=0), "alpha": alphas, "beta": betas}[schedule]
    low, high = {"right": (0, n), "one_to_T": (1, n + 1)}[t_range]
    size = (1,) if one_t else (b,)
    if noise_first:
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(low, high, size, generator=generator)
    else:
        t = torch.randint(low, high, size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
    ab = alpha_bar[t].view(-1, 1, 1, 1)                     # IndexError when t = T: that mistake is skipped
    signal, noise_coef = {"right": (ab.sqrt(), (1 - ab).sqrt()), "no_sqrt": (ab, 1 - ab),
                          "variance": (ab.sqrt(), 1 - ab), "swapped": ((1 - ab).sqrt(), ab.sqrt()),
                          "added": (1, (1 - ab).sqrt())}[coef]
    x_t = signal * x0 + noise_coef * noise                  # Ho et al. 2020, eq. 4
    pred = model(x_t, t.expand(b))
    goal = {"noise": noise, "x0": x0, "x_t": x_t}[target]
    return F.mse_loss(pred, goal, reduction=reduction)


def _loss_and_grads(fn: Callable, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's loss on the case (fresh stand-in model, fresh generator), and the gradients of its weights as one vector."""
    model = _build_predictor(case.inputs["betas"])
    generator = torch.Generator().manual_seed(case.inputs["seed"])
    with torch.enable_grad():
        loss = fn(model, case.inputs["x0"].clone(), case.inputs["betas"].clone(), generator)
        if not isinstance(loss, torch.Tensor):
            raise _Failed(f"the loss should be a tensor, got {type(loss).__name__} {loss!r}"[:200]
                          + _hint_line("give back the loss tensor itself, not its value as a Python number: the "
                                       "optimizer needs its gradient"))
        if loss.numel() != 1:
            raise _Failed(f"the loss should be one number (a 0-d tensor), got shape {tuple(loss.shape)}"
                          + _hint_line("average the squared error over the batch and every pixel"))
        if not loss.requires_grad:
            raise _Failed("the loss carries no gradient back to the model's weights"
                          + _hint_line("compute the prediction with gradients on (not in a no-grad block, not "
                                       "detached)"))
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    if all(g is None or not bool(g.any()) for g in grads):
        raise _Failed("no gradient reaches the model's weights: the loss does not depend on the model's prediction"
                      + _hint_line("the loss compares the model's prediction with the noise"))
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return loss.detach().reshape(()).float(), flat


def _compare_loss(got, expected) -> tuple[str | None, float]:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    if not _same(loss, ref_loss):
        return (f"the loss is {float(loss):.6g}, expected {float(ref_loss):.6g} (the same generator, the same "
                f"stand-in model)"), 0.0
    atol = _GRAD_ATOL_FRACTION * float(ref_grads.abs().max())
    if not _same(grads, ref_grads, atol=atol, rtol=_GRAD_RTOL):
        return "the loss is right but its gradients differ: is part of the loss computed without autograd?", 0.0
    return None, abs(float(loss - ref_loss))


def _loss_cases() -> list[Case]:
    with seeded(30):
        return [Case({"x0": randn(4, 3, 4, 4).clamp(-1, 1), "betas": linear_betas(), "seed": 1}),
                Case({"x0": randn(3, 3, 6, 6).clamp(-1, 1), "betas": linear_betas(), "seed": 2}),
                Case({"x0": randn(5, 3, 4, 4).clamp(-1, 1), "betas": linear_betas(50), "seed": 3})]


def _loss_behaviour(fn: Callable, case: Case) -> None:
    """Two calls with generators seeded alike, torch's global random state moved in between: the same loss."""
    losses = []
    for global_seed in (11, 12):
        torch.manual_seed(global_seed)
        losses.append(_loss_and_grads(fn, case)[0])
    if not _same(losses[0], losses[1]):
        raise _Failed(f"two calls with generators seeded alike gave two losses, {float(losses[0]):.6g} and "
                      f"{float(losses[1]):.6g}: something is drawn from torch's global random numbers"
                      + _hint_line("draw the timesteps and the noise from the generator that is passed in, so "
                                   "that a run can be replayed"))


def check_pixel_loss(fn) -> bool:
    """Exercise 4.1: fn(model, x0 (B, 3, H, W), betas (T,), generator) -> L_simple, t then noise from the generator.

    Besides the loss's value it checks its behaviour: gradients reach the model's weights (and match the
    reference's), and two calls with generators seeded alike give the same loss whatever torch's global random
    state (the generator is used, not the global random numbers).
    """
    def wrong(**how):
        return lambda ref, c: _loss_and_grads(lambda *a: _wrong_loss(*a, **how), c)

    mistakes = [
        Mistake("the target is the clean image x₀: this model predicts the NOISE ε (ε-prediction, Ho et al. "
                "2020, eq. 14), so the loss compares the prediction with ε", wrong(target="x0")),
        Mistake("the target is the noisy image x_t: the model must predict the noise ε that was added",
                wrong(target="x_t")),
        Mistake("α_t = 1 − β_t is used where ᾱ_t belongs: x_t needs the product of all the alphas up to t",
                wrong(schedule="alpha")),
        Mistake("β_t is used where ᾱ_t belongs: ᾱ_t is the running product of 1 − β up to t",
                wrong(schedule="beta")),
        Mistake("the square roots are missing: x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε", wrong(coef="no_sqrt")),
        Mistake("the noise is scaled by 1 − ᾱ_t, a variance: scale it by the standard deviation √(1 − ᾱ_t)",
                wrong(coef="variance")),
        Mistake("the coefficients are swapped: x₀ gets √ᾱ_t (close to 1 at small t), the noise √(1 − ᾱ_t)",
                wrong(coef="swapped")),
        Mistake("x₀ is not scaled down: with √ᾱ_t x₀ + √(1 − ᾱ_t) ε the variance stays at 1", wrong(coef="added")),
        Mistake("t is drawn from 1 to T: the timesteps are 0, 1, ..., T − 1 (the upper end excluded)",
                wrong(t_range="one_to_T")),
        Mistake("the noise is drawn before t: draw t first, then the noise, so that the same generator gives "
                "the same numbers as the reference", wrong(noise_first=True)),
        Mistake("one t for the whole batch: draw one timestep per image, B of them", wrong(one_t=True)),
        Mistake("the loss is summed: take the mean over the batch and every pixel", wrong(reduction="sum")),
    ]
    hint = ("draw B timesteps, then noise of x₀'s shape, both from the generator; x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε "
            "with ᾱ the running product of 1 − β; the loss is the mean squared error between the model's "
            "prediction at (x_t, t) and ε")

    def describe(c):
        return (f"x0 {tuple(c.inputs['x0'].shape)}, T = {len(c.inputs['betas'])}, "
                f"generator seeded {c.inputs['seed']}")

    return _run_check("check_pixel_loss", fn, reference_pixel_loss, _loss_cases(), _loss_and_grads,
                      _compare_loss, mistakes, hint, "Ho et al. 2020, Algorithm 1 (reference_pixel_loss)", describe,
                      exercise="4.1", behaviour=_loss_behaviour)


# ----------------------------------------------------------------------------------------------------------
# Exercise: the sampling loop (Ho et al. 2020, Algorithm 2, on a run of timesteps)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_ddpm_sample(model, x_T: torch.Tensor, timesteps: torch.Tensor, betas: torch.Tensor,
                          generator: torch.Generator, clip_x0: bool = True) -> torch.Tensor:
    """Ancestral sampling from x_T down the given timesteps, predicted x_0 clipped to [-1, 1] as in Ho et al.'s code
    (clip_x0=False: not clipped, as SD's sampler, for notebook 04's experiment)."""
    return _wrong_sample(model, x_T, timesteps, betas, generator, clip=clip_x0)


@torch.no_grad()
def _wrong_sample(model, x_T, timesteps, betas, generator, *, noise_at_end: bool = False, add_noise: bool = True,
                  model_t: str = "t", alpha: str = "jump", x0_sqrt: bool = True, clip: bool = True,
                  variance: str = "posterior", sqrt_std: bool = True, prev: str = "next", eps_as_x0: bool = False):
    """The sampling loop with one thing done a chosen wrong way (the defaults are the right way)."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    x, n = x_T, len(timesteps)
    for i in range(n):
        t = int(timesteps[i])
        last = i == n - 1
        t_prev = {"next": None if last else int(timesteps[i + 1]), "t_minus_1": t - 1 if t > 0 else None,
                  "wraps": -1 if last else int(timesteps[i + 1])}[prev]
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[t_prev] if t_prev is not None else torch.tensor(1.0)
        t_in = {"t": t, "index": i, "t_prev": t_prev if t_prev is not None else 0}[model_t]
        eps = model(x, torch.full((x.shape[0],), t_in, dtype=torch.long))
        alpha_t = {"jump": ab_t / ab_prev, "bar": ab_t, "train": 1 - betas[t]}[alpha]
        beta_t = 1 - alpha_t
        if eps_as_x0:
            x0 = eps
        else:
            x0 = (x - (1 - ab_t).sqrt() * eps) / (ab_t.sqrt() if x0_sqrt else ab_t)   # eq. 15
        if clip:
            x0 = x0.clamp(-1, 1)
        # the posterior mean mu_tilde(x_t, x0), Ho et al. 2020, eq. 7
        mean = ab_prev.sqrt() * beta_t / (1 - ab_t) * x0 + alpha_t.sqrt() * (1 - ab_prev) / (1 - ab_t) * x
        var = {"posterior": (1 - ab_prev) / (1 - ab_t) * beta_t, "beta": beta_t}[variance]   # beta_tilde, eq. 7
        std = var.clamp(min=0).sqrt() if sqrt_std else var
        if add_noise and (not last or noise_at_end):
            x = mean + std * torch.randn(x.shape, generator=generator)
        else:
            x = mean
    return x


def _sample_outputs(fn: Callable, case: Case) -> torch.Tensor:
    model = _build_predictor(case.inputs["betas"])
    generator = torch.Generator().manual_seed(case.inputs["seed"])
    with torch.no_grad():
        out = fn(model, case.inputs["x_T"].clone(), case.inputs["timesteps"].clone(), case.inputs["betas"].clone(),
                 generator)
    if not isinstance(out, torch.Tensor):
        raise _Failed(f"the sample should be a tensor of the shape of x_T, got {type(out).__name__}"
                      + _hint_line("give back x after the last step"))
    return out.detach().float()


def _compare_samples(got, expected) -> tuple[str | None, float]:
    if got.shape != expected.shape:
        return f"the sample has shape {tuple(got.shape)}, expected {tuple(expected.shape)}", 0.0
    if _same(got, expected, atol=1e-4, rtol=1e-4):
        return None, float((got - expected).abs().max())
    return (f"the sample differs from the reference's: max difference {float((got - expected).abs().max()):.3g} "
            f"(the same x_T, the same generator for the noise of each step)"), 0.0


def _sample_cases() -> list[Case]:
    with seeded(31):
        return [Case({"x_T": randn(2, 3, 4, 4), "timesteps": run_timesteps(50, 50), "betas": linear_betas(50),
                      "seed": 4}),
                Case({"x_T": randn(3, 3, 4, 5), "timesteps": run_timesteps(DDPM_T, 10), "betas": linear_betas(),
                      "seed": 5}),
                Case({"x_T": randn(1, 3, 6, 6), "timesteps": run_timesteps(DDPM_T, 25), "betas": linear_betas(),
                      "seed": 6})]


def check_ddpm_sampling(fn) -> bool:
    """Exercise 4.2: fn(model, x_T, timesteps (n,), betas (T,), generator) -> x_0, DDPM's steps with x_0 clipped."""
    def wrong(**how):
        return lambda ref, c: _sample_outputs(lambda *a: _wrong_sample(*a, **how), c)

    mistakes = [
        Mistake("after the last timestep the index wraps around to the NOISIEST ᾱ (the end of the table): the "
                "last step lands on x₀ itself, where ᾱ_prev = 1", wrong(prev="wraps")),
        Mistake("the noise has variance β_t and is added at the last step too: this exercise uses β̃_t (zero at "
                "the last step), and the last step gives back the mean, the model's best guess of x₀ "
                "(Ho et al. 2020, Algorithm 2: z = 0 when t = 1, the paper counting from 1)",
                wrong(variance="beta", noise_at_end=True)),
        Mistake("no noise is added: DDPM samples x_prev = mean + √β̃_t z with a fresh z at every step but the "
                "last", wrong(add_noise=False)),
        Mistake("the model is given the step's index i, not its timestep t (the i-th entry of the run)",
                wrong(model_t="index")),
        Mistake("t is off by one: the model is given the next timestep of the run; give it the t of the x it sees",
                wrong(model_t="t_prev")),
        Mistake("ᾱ_t is used where the step's α_t belongs: α_t = ᾱ_t / ᾱ_prev (= 1 − β_t when the run visits "
                "every timestep)", wrong(alpha="bar")),
        Mistake("α_t = 1 − β_t of one training step is used, but this run jumps over several timesteps: "
                "α_t = ᾱ_t / ᾱ_prev", wrong(alpha="train")),
        Mistake("ᾱ_prev is taken at t − 1, but the run jumps to the next of its timesteps: ᾱ_prev is ᾱ at the "
                "run's next timestep (1 after the last step)", wrong(prev="t_minus_1")),
        Mistake("the predicted x₀ is not clipped to [−1, 1]: an undertrained model's x₀ overshoots the pixel "
                "range, and the clipping (in Ho et al.'s code, and diffusers' clip_sample) keeps the run in it",
                wrong(clip=False)),
        Mistake("the predicted x₀ divides by ᾱ_t: the square root is missing, x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t",
                wrong(x0_sqrt=False)),
        Mistake("the model's output is used as x₀: this model predicts the noise; x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / "
                "√ᾱ_t", wrong(eps_as_x0=True)),
        Mistake("the noise is multiplied by the variance β̃_t: multiply it by the standard deviation √β̃_t",
                wrong(sqrt_std=False)),
        Mistake("the noise has variance β_t (Ho et al.'s other choice, σ_t² = β_t): this exercise uses the "
                "posterior's β̃_t = (1 − ᾱ_prev) / (1 − ᾱ_t) · β_t", wrong(variance="beta")),
    ]
    hint = ("at each step: ᾱ_t at this timestep and ᾱ_prev at the next one (1 after the last); the jump's "
            "α_t = ᾱ_t / ᾱ_prev and β_t = 1 − α_t; x̂₀ from the predicted noise, clipped to [−1, 1]; the "
            "posterior mean μ̃(x_t, x̂₀) of section 6; then add √β̃_t times fresh noise from the generator, "
            "except after the last step")

    def describe(c):
        ts = c.inputs["timesteps"]
        return (f"x_T {tuple(c.inputs['x_T'].shape)}, T = {len(c.inputs['betas'])}, {len(ts)} timesteps "
                f"{ts[0].item()}, {ts[1].item()}, ..., {ts[-1].item()}, generator seeded {c.inputs['seed']}")

    return _run_check("check_ddpm_sampling", fn, reference_ddpm_sample, _sample_cases(), _sample_outputs,
                      _compare_samples, mistakes, hint, "Ho et al. 2020, Algorithm 2 (reference_ddpm_sample)",
                      describe, exercise="4.2")
