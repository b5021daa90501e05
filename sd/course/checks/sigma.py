"""Checks for the σ-view notebook (08): Euler's, Heun's and DPM-Solver++(2M)'s samplers of the probability-flow ODE,
Karras et al.'s noise levels, and the convergence measurement.

The samplers work on the unscaled latent x = x_0 + sigma * noise, start from x_T ~ N(0, I) scaled by
sqrt(1 + sigma_max^2), and ask `predict_eps(x, sigma)` for the model's noise prediction. The references are written
here after the papers (Karras et al. 2022, Algorithm 1 and eq. 5; Lu et al. 2022, Algorithm 2, in sigma);
tests/test_checks_sigma.py proves that they are what `sd.samplers` and diffusers compute, and that they converge at
their order on a problem whose exact solution is known. The `Mistake`s recompute them the typical wrong ways (the
start not scaled, the slope read at the wrong level, Heun's correction at sigma = 0, DPM-Solver's extrapolation to
the end of the step, ...), so a wrong answer is named, not just reported. Every message is words and maths.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ...diffusion import DiffusionScheduler
from .common import Case, Mistake, check_function, randn, require_callable, seeded

# Karras et al. 2022, eq. 5 and sec. 3: rho = 7 puts more of the steps at low noise.
KARRAS_RHO = 7.0
# SD v1's noise levels, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): 0.0292 at t = 0, 14.61 at t = 999.
_SIGMAS = DiffusionScheduler().sigmas
# The toy data of the checks: N(0, DATA_STD^2) per entry, whose exact denoiser is known (see gaussian_eps).
DATA_STD = 0.5

# predict_eps(x, sigma) -> eps: the model's noise prediction at the unscaled latent x and noise level sigma.
EpsPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gaussian_eps(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact noise prediction when the data are N(0, DATA_STD^2): D(x; sigma) = s^2 / (s^2 + sigma^2) x.

    eps = (x - D) / sigma = sigma / (s^2 + sigma^2) x; the ODE's exact solution is then
    x(sigma) = x(sigma_0) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (tests use it to measure each solver's order).
    """
    return sigma / (DATA_STD ** 2 + sigma ** 2) * x


def _wobbly_eps(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A noise predictor that is not linear in x and depends on sigma, so every mistake shows in the numbers."""
    return gaussian_eps(x, sigma) + 0.3 * torch.tanh(x) * torch.sin(3 * torch.log1p(sigma))


# ----------------------------------------------------------------------------------------------------------
# The references
# ----------------------------------------------------------------------------------------------------------

def _start(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x at the first level from x_T ~ N(0, I): x = x_t / sqrt(alpha_bar) = x_t sqrt(1 + sigma^2)."""
    return noise * (1 + sigmas[0] ** 2) ** 0.5


def reference_euler_sample(predict_eps: EpsPredictor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler's method down the levels `sigmas` (the last usually 0), Karras et al. 2022, Algorithm 1 without 2nd order."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        d = predict_eps(x, sigmas[i])                  # dx/dsigma = (x - D) / sigma = eps
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def reference_heun_sample(predict_eps: EpsPredictor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun's method, Karras et al. 2022, Algorithm 1 (deterministic): an Euler step, then the trapezoidal rule
    with the slope at the arrival point, except for a step to sigma = 0 (Euler there)."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = predict_eps(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = predict_eps(x_euler, sigma_next)  # the slope where the Euler step arrived
            x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x


def reference_dpmpp_2m_sample(predict_eps: EpsPredictor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, written in sigma: exact for a denoised D held over the step,
    with D extrapolated (linearly in lambda = -log sigma) to the middle of the step from this and the last step."""
    x = _start(noise, sigmas)
    denoised_prev, h_prev = None, None                 # the multistep memory: the last step's D and length
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = x - sigma * predict_eps(x, sigma)   # D(x; sigma), the predicted x_0
        h = torch.log(sigma / sigma_next) if sigma_next > 0 else None   # the step's length in lambda = -log sigma
        if denoised_prev is None or h is None:
            D = denoised                               # first order: the same step as DDIM and Euler
        else:
            r = h_prev / h                             # r_i = h_(i-1) / h_i
            D = denoised + (denoised - denoised_prev) / (2 * r)   # D at the middle of the step
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * D   # exact for D held over the step
        denoised_prev, h_prev = denoised, h
    return x


# ----------------------------------------------------------------------------------------------------------
# Exercise 8.1: Euler's sampler
# ----------------------------------------------------------------------------------------------------------

def _sampler_cases(seed: int) -> list[Case]:
    """Three runs: SD's even-in-t levels (6 steps), Karras-like levels (5 steps), and a run that stops above 0."""
    even = torch.cat([_SIGMAS[torch.linspace(999, 0, 6).round().long()], torch.zeros(1)])
    karras = torch.cat([reference_karras_sigmas(float(_SIGMAS[0]), float(_SIGMAS[-1]), 5).float(), torch.zeros(1)])
    partial = _SIGMAS[torch.tensor([700, 500, 300, 200])]
    cases = []
    with seeded(seed):
        for j, levels in enumerate((even, karras, partial)):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 4, 8, 8)
            cases.append(Case({"predict_eps": _wobbly_eps, "noise": randn(*shape), "sigmas": levels.clone()}))
    return cases


def _with_levels(loop):
    """A mistake's sampler: loop(predict_eps, noise, sigmas) computed for the case's inputs."""
    return lambda ref, c: loop(*c.inputs.values())


def _euler_wrong(kind):
    def loop(predict_eps, noise, sigmas):
        x = {"unscaled": noise, "sigma_max": noise * sigmas[0]}.get(kind, _start(noise, sigmas))
        last = len(sigmas) - 2 if kind == "short" else len(sigmas) - 1
        for i in range(last):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if kind == "slope_at_next":
                d = predict_eps(x, sigma_next)
            elif kind == "scaled_input":
                d = predict_eps(x / (1 + sigma ** 2) ** 0.5, sigma)
            else:
                d = predict_eps(x, sigma)
            if kind == "sign":
                x = x + (sigma - sigma_next) * d
            elif kind == "to_denoised":
                x = x - sigma * d
            elif kind == "vp":
                x = (x + (sigma_next - sigma) * d) / (1 + sigma_next ** 2) ** 0.5
            else:
                x = x + (sigma_next - sigma) * d
        return x
    return loop


def check_euler_sampler(fn) -> bool:
    """Exercise 8.1: fn(predict_eps, noise, sigmas) -> x at sigmas[-1], by Euler steps from x_T = noise."""
    mistakes = [
        Mistake("the run starts from the noise itself: x_T ~ N(0, I) is the variance-preserving x_t; in the sigma "
                "view x = x_t / sqrt(alpha_bar) = sqrt(1 + sigma^2) x_t", _with_levels(_euler_wrong("unscaled"))),
        Mistake("the run starts at sigma_max times the noise (Karras' own start, x = x_0 + sigma eps with x_0 "
                "neglected): SD's samplers start from x_T ~ N(0, I), which is sqrt(1 + sigma_max^2) times the noise "
                "in the sigma view", _with_levels(_euler_wrong("sigma_max"))),
        Mistake("the slope is read at the next level: Euler's method takes the slope where the step starts, "
                "at sigma_i", _with_levels(_euler_wrong("slope_at_next"))),
        Mistake("the model is given x divided by sqrt(1 + sigma^2): predict_eps takes x in the sigma view and "
                "scales it for the UNet itself", _with_levels(_euler_wrong("scaled_input"))),
        Mistake("the steps go the wrong way: x moves by (sigma_next - sigma) times the slope, and sigma_next < "
                "sigma, so noise is taken out", _with_levels(_euler_wrong("sign"))),
        Mistake("each step jumps to the denoised D = x - sigma eps: it goes only to sigma_next, by (sigma_next - "
                "sigma) times the slope", _with_levels(_euler_wrong("to_denoised"))),
        Mistake("each step is scaled back to the variance-preserving x_t: in the sigma view x = x_0 + sigma "
                "noise is never rescaled (only the UNet's input is, inside predict_eps)",
                _with_levels(_euler_wrong("vp"))),
        Mistake("the loop stops one level early: n + 1 levels make n steps, the last one landing on the last "
                "level", _with_levels(_euler_wrong("short"))),
    ]
    return check_function("check_euler_sampler", fn, reference_euler_sample, _sampler_cases(60), mistakes,
                          exercise="8.1", reference_name="Euler's method on the probability-flow ODE (Karras et al. "
                                                         "2022, Algorithm 1, first order)",
                          hint="start from the noise scaled to the first level; at each level the slope is the "
                               "predicted noise there; step by the change in sigma")


# ----------------------------------------------------------------------------------------------------------
# Exercise 8.2: Karras et al.'s noise levels
# ----------------------------------------------------------------------------------------------------------

def reference_karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho), Karras et al. 2022, eq. 5."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)          # i / (N - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _as_float64(fn):
    """fn with its output as a float64 tensor: float32 or a list of numbers is fine for the check."""
    def call(*args):
        out = fn(*args)
        try:
            return torch.as_tensor(out).to(torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return out
    call.__name__, call.__qualname__, call.__module__ = (getattr(fn, "__name__", "fn"), getattr(fn, "__qualname__", "fn"),
                                                         getattr(fn, "__module__", "?"))
    return call


def check_karras_sigmas(fn) -> bool:
    """Exercise 8.2: fn(sigma_min, sigma_max, n, rho) -> (n,) noise levels, sigma_max first, Karras et al. 2022, eq. 5."""
    cases = [Case({"sigma_min": float(_SIGMAS[0]), "sigma_max": float(_SIGMAS[-1]), "n": 10, "rho": KARRAS_RHO}),
             Case({"sigma_min": 0.002, "sigma_max": 80.0, "n": 18, "rho": KARRAS_RHO}),     # Karras' own range
             Case({"sigma_min": float(_SIGMAS[0]), "sigma_max": float(_SIGMAS[-1]), "n": 25, "rho": 3.0})]

    def wrong(kind):
        def compute(ref, c):
            lo, hi, n, rho = c.inputs.values()
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            return {"ascending": reference_karras_sigmas(lo, hi, n, rho).flip(0),
                    "inverted_rho": (hi ** rho + ramp * (lo ** rho - hi ** rho)) ** (1 / rho),
                    "no_power": hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho)),
                    "linear": hi + ramp * (lo - hi),
                    "log_linear": torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi))),
                    "seven": reference_karras_sigmas(lo, hi, n, KARRAS_RHO),
                    "n_plus_one": reference_karras_sigmas(lo, hi, n + 1, rho)[:n]}[kind]
        return compute

    mistakes = [
        Mistake("the levels are in increasing order: a run starts at sigma_max (the noisiest) and ends at "
                "sigma_min", wrong("ascending")),
        Mistake("rho and 1/rho are swapped: space the levels evenly in sigma^(1/rho), then raise to the power rho",
                wrong("inverted_rho")),
        Mistake("the final power rho is missing: these are the evenly spaced sigma^(1/rho) values themselves",
                wrong("no_power")),
        Mistake("the levels are evenly spaced in sigma (that is rho = 1): space them in sigma^(1/rho)",
                wrong("linear")),
        Mistake("the levels are evenly spaced in log(sigma) (the limit rho -> infinity): space them in "
                "sigma^(1/rho)", wrong("log_linear")),
        Mistake("rho is fixed at 7: use the rho given", wrong("seven")),
        Mistake("the ramp has n + 1 points: the n levels are i / (n - 1) of the way, for i from 0 to n - 1, the "
                "last exactly at sigma_min", wrong("n_plus_one")),
    ]
    return check_function("check_karras_sigmas", _as_float64(fn), reference_karras_sigmas, cases, mistakes,
                          exercise="8.2", reference_name="Karras et al. 2022, eq. 5",
                          hint="n levels, evenly spaced in sigma^(1/rho) from sigma_max^(1/rho) to "
                               "sigma_min^(1/rho), each raised back to the power rho")


# ----------------------------------------------------------------------------------------------------------
# Exercise 8.3: Heun's sampler
# ----------------------------------------------------------------------------------------------------------

def _heun_wrong(kind):
    def loop(predict_eps, noise, sigmas):
        x = _start(noise, sigmas)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            d = predict_eps(x, sigma)
            x_euler = x + (sigma_next - sigma) * d
            if kind == "euler" or (sigma_next == 0 and kind != "corrects_at_zero"):
                x = x_euler
                continue
            d_next = predict_eps(x_euler, sigma if kind == "second_at_sigma" else sigma_next)
            if kind == "from_euler":
                x = x_euler + (sigma_next - sigma) * (d + d_next) / 2
            elif kind == "new_slope_only":
                x = x + (sigma_next - sigma) * d_next
            elif kind == "second_at_start":
                x = x + (sigma_next - sigma) * (d + predict_eps(x, sigma_next)) / 2
            else:
                x = x + (sigma_next - sigma) * (d + d_next) / 2
        return x
    return loop


def check_heun_sampler(fn) -> bool:
    """Exercise 8.3: fn(predict_eps, noise, sigmas) -> x at sigmas[-1], by Heun's steps (Karras et al., Alg. 1)."""
    mistakes = [
        Mistake("this is Euler's method: after the Euler step, read the slope where it arrived and redo the step "
                "from the start with the average of the two slopes", _with_levels(_heun_wrong("euler"))),
        Mistake("the step to sigma = 0 is corrected too: there Karras' Algorithm 1 keeps the Euler step (the slope "
                "at sigma = 0 is 0/0, and a real network was never trained there)",
                _with_levels(_heun_wrong("corrects_at_zero"))),
        Mistake("the corrected step starts from the Euler step's arrival point: redo the step from where it "
                "started, with the average slope", _with_levels(_heun_wrong("from_euler"))),
        Mistake("only the arrival point's slope is used: the trapezoidal rule averages the slope at the start "
                "and at the arrival", _with_levels(_heun_wrong("new_slope_only"))),
        Mistake("the second slope is read at the arrival point but with the starting noise level: the arrival "
                "point sits at sigma_next", _with_levels(_heun_wrong("second_at_sigma"))),
        Mistake("the second slope is read at the starting point: read it at the Euler step's arrival point, "
                "at sigma_next", _with_levels(_heun_wrong("second_at_start"))),
    ]
    return check_function("check_heun_sampler", fn, reference_heun_sample, _sampler_cases(61), mistakes,
                          exercise="8.3", reference_name="Heun's method (Karras et al. 2022, Algorithm 1)",
                          hint="each step: an Euler step to the next level, the slope where it arrives, then the "
                               "step again from the start with the average slope; a step to sigma = 0 stays Euler")


# ----------------------------------------------------------------------------------------------------------
# Exercise 8.4: DPM-Solver++(2M)'s sampler
# ----------------------------------------------------------------------------------------------------------

def _dpmpp_wrong(kind):
    def loop(predict_eps, noise, sigmas):
        x = _start(noise, sigmas)
        denoised_prev, h_prev = None, None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = x - sigma * predict_eps(x, sigma)
            if kind == "first_order" or denoised_prev is None or sigma_next == 0:
                D = denoised
            else:
                h = torch.log(sigma / sigma_next) if kind != "h_in_sigma" else sigma - sigma_next
                r = h_prev / h if kind != "r_inverted" else h / h_prev
                factor = {"end_of_step": 1 / r}.get(kind, 1 / (2 * r))
                D = denoised + factor * (denoised - denoised_prev)
            if kind == "swapped_weights":
                x = (1 - sigma_next / sigma) * x + (sigma_next / sigma) * D
            else:
                x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * D
            if sigma_next > 0:
                h_prev = torch.log(sigma / sigma_next) if kind != "h_in_sigma" else sigma - sigma_next
            denoised_prev = denoised
        return x
    return loop


def check_dpmpp_2m_sampler(fn) -> bool:
    """Exercise 8.4: fn(predict_eps, noise, sigmas) -> x at sigmas[-1], by DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)."""
    mistakes = [
        Mistake("every step is first order (this is DDIM, which is Euler): from the second step on, replace D by "
                "its value extrapolated to the middle of the step from this step's and the last step's D",
                _with_levels(_dpmpp_wrong("first_order"))),
        Mistake("D is extrapolated to the END of the step: DPM-Solver++(2M) extrapolates to its middle, half a "
                "step h further in λ = -log σ, so the extra term is (D_i - D_(i-1)) / (2r)",
                _with_levels(_dpmpp_wrong("end_of_step"))),
        Mistake("the ratio r is inverted: r = h_(i-1) / h_i, the last step's length over this one's (both in "
                "λ = -log σ)", _with_levels(_dpmpp_wrong("r_inverted"))),
        Mistake("the step lengths are measured in sigma: the solver works in λ = -log σ, so "
                "h = log(sigma_i / sigma_(i+1))", _with_levels(_dpmpp_wrong("h_in_sigma"))),
        Mistake("the weights of x and D are swapped: holding D fixed, x at sigma_next is sigma_next / sigma of x "
                "plus the rest, 1 - sigma_next / sigma, of D", _with_levels(_dpmpp_wrong("swapped_weights"))),
    ]
    return check_function("check_dpmpp_2m_sampler", fn, reference_dpmpp_2m_sample, _sampler_cases(62), mistakes,
                          exercise="8.4", reference_name="DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)",
                          hint="with D held fixed the step is exact: x moves to sigma_next / sigma of itself plus "
                               "the rest of D; from the second step on (and not into sigma = 0), D is this step's "
                               "denoised moved half a step further along the line through the last two")


# ----------------------------------------------------------------------------------------------------------
# Exercise 8.5: measuring a solver's error against its cost
# ----------------------------------------------------------------------------------------------------------

def reference_error_curve(solver, predict_eps: EpsPredictor, levels_of, step_counts, noise: torch.Tensor,
                          reference: torch.Tensor) -> list[tuple[int, float, float]]:
    """For each n in step_counts: (UNet passes of the run, median and largest RMS distance to `reference` over the
    starting noises). solver(predict_eps, noise, levels_of(n)) runs the whole batch; each call of predict_eps is
    one pass, whatever the batch."""
    curve = []
    for n in step_counts:
        passes = 0

        def counting(x, sigma):
            nonlocal passes
            passes += 1
            return predict_eps(x, sigma)

        out = solver(counting, noise, levels_of(n))
        rms = (out - reference).pow(2).flatten(1).mean(1).sqrt()          # (B,) one distance per starting noise
        curve.append((passes, rms.median().item(), rms.max().item()))
    return curve


def _curve_cases() -> list[Case]:
    def even_levels(n):
        return torch.cat([_SIGMAS[torch.linspace(999, 0, n).round().long()], torch.zeros(1)])

    with seeded(63):
        noise = randn(5, 4, 4, 4)
    reference = reference_heun_sample(_wobbly_eps, noise, even_levels(200))
    return [Case({"solver": solver, "predict_eps": _wobbly_eps, "levels_of": even_levels, "step_counts": (3, 6, 12),
                  "noise": noise, "reference": reference})
            for solver in (reference_euler_sample, reference_heun_sample)]


def _curve_wrong(kind):
    def compute(ref, c):
        solver, predict_eps, levels_of, step_counts, noise, reference = c.inputs.values()
        curve, total = [], 0
        for n in step_counts:
            calls = [0]

            def counting(x, sigma):
                calls[0] += 1
                return predict_eps(x, sigma)

            out = solver(counting, noise, levels_of(n))
            total += calls[0]
            diff = out - reference
            per = {"mse": diff.pow(2).flatten(1).mean(1),
                   "max_abs": diff.abs().flatten(1).amax(1)}.get(kind, diff.pow(2).flatten(1).mean(1).sqrt())
            if kind == "whole_batch":
                per = diff.pow(2).mean().sqrt().expand(len(noise))
            middle = per.mean().item() if kind == "mean" else per.median().item()
            passes = {"steps": n, "cumulative": total}.get(kind, calls[0])
            curve.append((passes, middle, per.max().item()))
        return curve
    return compute


def _as_curve(fn):
    """fn's curve as a tensor (n, 3): a list of tuples of numbers compares like the reference's."""
    def call(*args):
        out = fn(*args)
        try:
            return torch.tensor([[float(v) for v in row] for row in out], dtype=torch.float64)
        except (TypeError, ValueError):
            return out
    call.__name__, call.__qualname__ = getattr(fn, "__name__", "fn"), getattr(fn, "__qualname__", "fn")
    call.__module__ = getattr(fn, "__module__", "?")
    return call


def check_error_curve(fn) -> bool:
    """Exercise 8.5: fn(solver, predict_eps, levels_of, step_counts, noise, reference) -> [(passes, median RMS,
    largest RMS), ...], one entry per step count."""
    require_callable("check_error_curve", fn)
    mistakes = [
        Mistake("the passes are the steps: count the calls of the noise predictor; Heun's method makes two per "
                "step but one for the last step to sigma = 0", lambda ref, c: _curve_tensor(_curve_wrong("steps"), c)),
        Mistake("the passes add up over the runs: count each run's calls from zero",
                lambda ref, c: _curve_tensor(_curve_wrong("cumulative"), c)),
        Mistake("the distance is the mean squared error: the RMS distance is its square root",
                lambda ref, c: _curve_tensor(_curve_wrong("mse"), c)),
        Mistake("the distance is the largest absolute difference: take the root of the mean square over each "
                "latent's entries", lambda ref, c: _curve_tensor(_curve_wrong("max_abs"), c)),
        Mistake("one RMS over the whole batch: take one RMS per starting noise (over its own latent), then the "
                "median and the largest of those", lambda ref, c: _curve_tensor(_curve_wrong("whole_batch"), c)),
        Mistake("the mean over the starting noises, not the median: one run that lands on another picture then "
                "decides the number", lambda ref, c: _curve_tensor(_curve_wrong("mean"), c)),
    ]
    return check_function("check_error_curve", _as_curve(fn), _as_curve(reference_error_curve), _curve_cases(),
                          mistakes, exercise="8.5", reference_name="the measurement of section 7",
                          hint="per step count: run the solver with a predictor that counts its calls, then one RMS "
                               "distance per starting noise; keep the passes, the median and the largest",
                          atol=1e-6, rtol=1e-4)


def _curve_tensor(compute, case):
    rows = compute(None, case)
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
