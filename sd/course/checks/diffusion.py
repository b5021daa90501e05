"""Checks for notebook 06 (forward diffusion): x_0, eps and v read off one another (6.1), the ideal observer who tells
which picture a noisy one came from (6.2), and a schedule shifted for a larger picture (6.3).

Each reference is written here from the forward process, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps
(Ho et al. 2020, eq. 4), and v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4);
tests/test_checks_diffusion.py compares them with diffusers. The `Mistake`s recompute them the typical wrong ways
(v with the other sign, the square roots missing, candidates not scaled, the SNR divided by the side ratio instead
of its square, ...), so a wrong answer is named in words, not just reported.
"""
from __future__ import annotations

import torch

from ...diffusion import DiffusionScheduler
from .common import Case, Mistake, check_function, randn, seeded

# The three things a diffusion network may predict (exercise 6.1's `kind`).
PREDICTION_KINDS = ("epsilon", "x0", "v")

# ----------------------------------------------------------------------------------------------------------
# Exercise 6.1: from one prediction to all three (x_0, eps, v)
# ----------------------------------------------------------------------------------------------------------


def reference_predictions(output: torch.Tensor, kind: str, x_t: torch.Tensor,
                          alpha_bar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, eps, v) given x_t and the network's `output`, which is the `kind` ("epsilon", "x0" or "v") of them."""
    return _predictions(output, kind, x_t, alpha_bar_t)


def _predictions(output, kind, x_t, alpha_bar_t, *, roots: bool = True, v_sign: float = 1.0,
                 v_like_eps: bool = False, order: str = "x0 eps v"):
    """The conversions with one thing done a chosen wrong way (the defaults are the right way)."""
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"kind must be one of {PREDICTION_KINDS}, got {kind!r}")
    signal, noise = (alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()) if roots else (alpha_bar_t, 1 - alpha_bar_t)
    if kind == "epsilon":
        eps = output
        x0 = (x_t - noise * eps) / signal                      # solve x_t = signal x0 + noise eps for x0
    elif kind == "x0":
        x0 = output
        eps = (x_t - signal * x0) / noise
    elif v_like_eps:                                           # v read as if it were the noise
        x0 = (x_t - noise * output) / signal
        eps = (x_t - signal * x0) / noise
    else:
        v = v_sign * output
        x0 = signal * x_t - noise * v                          # (x_t, v) is (x0, eps) rotated: rotate back
        eps = noise * x_t + signal * v
    v = v_sign * (signal * eps - noise * x0)
    return {"x0 eps v": (x0, eps, v), "eps x0 v": (eps, x0, v)}[order]


def _prediction_cases() -> list[Case]:
    with seeded(60):
        cases = []
        for kind, shape in zip(PREDICTION_KINDS * 2, [(2, 3, 4, 4), (3, 4, 4, 4), (2, 4, 5, 3),
                                                      (1, 3, 4, 4), (4, 4, 3, 3), (3, 3, 4, 4)]):
            b = shape[0]
            alpha_bar_t = torch.rand(b).clamp(0.02, 0.98).view(b, 1, 1, 1)   # one alpha_bar per sample
            cases.append(Case({"output": randn(*shape), "kind": kind, "x_t": randn(*shape),
                               "alpha_bar_t": alpha_bar_t}))
        return cases


def check_predictions(fn) -> bool:
    """Exercise 6.1: fn(output, kind, x_t, alpha_bar_t (B, 1, 1, 1)) -> (x0, eps, v), for kind epsilon, x0 or v."""
    def wrong(**how):
        return lambda ref, c: _predictions(*c.inputs.values(), **how)

    mistakes = [
        Mistake("v has the other sign: here v = √ᾱ ε − √(1 − ᾱ) x₀ (Salimans & Ho 2022), so that v points from "
                "the picture towards the noise as t grows", wrong(v_sign=-1.0)),
        Mistake("the square roots are missing: the coefficients of x₀ and ε in x_t are √ᾱ and √(1 − ᾱ), the "
                "square roots of the variances ᾱ and 1 − ᾱ", wrong(roots=False)),
        Mistake("a v-prediction is read as if it were the noise: v is neither x₀ nor ε but a mix of both; "
                "(x_t, v) is (x₀, ε) turned by the angle φ with cos φ = √ᾱ, so turn it back",
                wrong(v_like_eps=True)),
        Mistake("the first two outputs are swapped: the exercise asks for (x₀, ε, v), in that order",
                wrong(order="eps x0 v")),
    ]
    return check_function("check_predictions", fn, reference_predictions, _prediction_cases(), mistakes,
                          hint="write x_t and v as two equations in the unknowns x₀ and ε, and solve them for "
                               "whichever one the network did not give",
                          reference_name="the exact conversion",
                          exercise="6.1")


# ----------------------------------------------------------------------------------------------------------
# Exercise 6.2: the ideal observer, which candidate is the noisy picture most likely to come from?
# ----------------------------------------------------------------------------------------------------------


def reference_identify(x_t: torch.Tensor, candidates: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """(B,) int64: for each x_t, the candidate x_0 under which q(x_t | x_0) is largest."""
    return _identify(x_t, candidates, alpha_bar_t)


def _identify(x_t, candidates, alpha_bar_t, *, scale: str = "sqrt", rule: str = "nearest", out: str = "index"):
    """The observer with one thing done a chosen wrong way (the defaults are the right way)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype)
    means = {"sqrt": alpha_bar_t.sqrt(), "none": torch.ones(()), "alpha_bar": alpha_bar_t}[scale] * candidates
    flat_x, flat_m = x_t.flatten(1), means.flatten(1)                  # (B, D), (N, D)
    if rule == "dot":                                                  # the largest dot product
        return (flat_x @ flat_m.T).argmax(dim=1)
    distances = torch.cdist(flat_x.double(), flat_m.double()) ** 2    # (B, N) squared distances
    if out == "distances":
        return distances.to(x_t.dtype)
    return distances.argmax(dim=1) if rule == "farthest" else distances.argmin(dim=1)


def _identify_cases() -> list[Case]:
    """Candidates of very different sizes (so that the dot product and the unscaled distance pick others), and
    noisy pictures made from them at alpha_bar where the answer is neither always right nor chance."""
    cases = []
    with seeded(61):
        for (b, n, shape), alpha_bar in zip([(24, 8, (3, 4, 4)), (16, 12, (4, 3, 3)), (20, 6, (1, 5, 5))],
                                            [0.05, 0.2, 0.02]):
            candidates = randn(n, *shape) * torch.linspace(0.3, 3.0, n).view(n, 1, 1, 1)
            which = torch.randint(0, n, (b,))
            x_t = alpha_bar ** 0.5 * candidates[which] + (1 - alpha_bar) ** 0.5 * randn(b, *shape)
            cases.append(Case({"x_t": x_t, "candidates": candidates, "alpha_bar_t": alpha_bar}))
    return cases


def check_identify(fn) -> bool:
    """Exercise 6.2: fn(x_t (B, C, H, W), candidates (N, C, H, W), alpha_bar_t) -> (B,) the index of the likeliest."""
    def wrong(**how):
        return lambda ref, c: _identify(*c.inputs.values(), **how)

    mistakes = [
        Mistake("the candidates are compared as they are: x_t holds the picture scaled down by √ᾱ, so compare "
                "it with √ᾱ times each candidate", wrong(scale="none")),
        Mistake("the candidates are scaled by ᾱ: the mean of q(x_t | x₀) is √ᾱ x₀", wrong(scale="alpha_bar")),
        Mistake("the largest dot product is taken: it ignores that candidates differ in size; the likeliest "
                "candidate is the one whose scaled version is nearest to x_t (the smallest squared distance)",
                wrong(rule="dot")),
        Mistake("this is the farthest candidate: the likeliest is the nearest one (the Gaussian's density falls "
                "with the squared distance)", wrong(rule="farthest")),
        Mistake("these are the squared distances of every pair: give back, for each noisy picture, the index of "
                "the nearest candidate", wrong(out="distances")),
    ]
    return check_function("check_identify", fn, reference_identify, _identify_cases(), mistakes,
                          hint="q(x_t | x₀) is a Gaussian around √ᾱ x₀ with the same variance in every direction: "
                               "the likeliest candidate is the one whose scaled version is nearest to x_t",
                          reference_name="the ideal observer", exercise="6.2")


# ----------------------------------------------------------------------------------------------------------
# Exercise 6.3: the schedule shifted for a picture `scale` times larger per side
# ----------------------------------------------------------------------------------------------------------


def reference_shift_schedule(alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """alpha_bar of the schedule whose SNR at every t is the given one divided by scale squared."""
    return _shifted(alphas_cumprod, scale)


def _shifted(alphas_cumprod, scale, *, power: float = 2.0, direction: str = "divide", what: str = "alpha_bar"):
    snr = alphas_cumprod / (1 - alphas_cumprod)
    snr = snr / scale ** power if direction == "divide" else snr * scale ** power
    return snr if what == "snr" else snr / (1 + snr)


def check_shift_schedule(fn) -> bool:
    """Exercise 6.3: fn(alphas_cumprod (T,), scale) -> (T,) alpha_bar whose SNR is the given SNR / scale**2."""
    schedule = DiffusionScheduler().alphas_cumprod
    cases = [Case({"alphas_cumprod": schedule, "scale": 4.0}),
             Case({"alphas_cumprod": DiffusionScheduler(50, 1e-4, 0.02).alphas_cumprod, "scale": 2.0}),
             Case({"alphas_cumprod": schedule, "scale": 0.5})]

    def wrong(**how):
        return lambda ref, c: _shifted(*c.inputs.values(), **how)

    mistakes = [
        Mistake("the SNR is divided by the side ratio: a picture k times larger per side has k² times as many "
                "pixels, so divide the SNR by k²", wrong(power=1.0)),
        Mistake("the SNR is multiplied by k²: a larger picture needs MORE noise (a lower SNR) for the same "
                "difficulty", wrong(direction="multiply")),
        Mistake("this is the shifted SNR: turn it back into ᾱ (ᾱ = SNR / (1 + SNR))", wrong(what="snr")),
        Mistake("ᾱ itself is divided by k²: it is the SNR, ᾱ / (1 − ᾱ), that scales with the number of pixels",
                lambda ref, c: c.inputs["alphas_cumprod"] / c.inputs["scale"] ** 2),
    ]
    return check_function("check_shift_schedule", fn, reference_shift_schedule, cases, mistakes,
                          hint="go from ᾱ to the SNR, divide it by the square of the side ratio, and come back "
                               "from the SNR to ᾱ",
                          reference_name="the shifted schedule (SNR / k²)", exercise="6.3")
