"""Checks for the editing notebook (11): inpainting's latent blending, one DDIM inversion step, slerp.

The references are written here after the papers and are proved in tests/test_checks_editing.py to be what `sd`
and diffusers compute: the blend in a sampling loop gives `sd.editing.inpaint.inpaint`'s latents (and is
diffusers' inpainting blend with `add_noise`), the inversion step in a loop gives `sd.editing.inversion.invert`'s
noise (and is diffusers' DDIMInverseScheduler.step), and slerp is `sd.editing.interpolation.slerp` itself. The
`Mistake`s recompute them the typical wrong ways (the mask the wrong way round, the original left clean, the two
noise levels swapped, plain lerp, the angle of unnormalised vectors, ...), so a wrong answer is named.
"""
from __future__ import annotations

import torch

from ...diffusion import DiffusionScheduler
from ...editing.interpolation import lerp, slerp
from ...samplers import predict_x0, q_sample
from .common import Case, Mistake, check_function, randn, seeded

# SD v1's schedule: the noise levels the cases take their values from.
_ALPHAS_CUMPROD = DiffusionScheduler().alphas_cumprod
# (t, t_next) of a 50-step SD run, t_next being the noisier one for inversion: from x_0's level up to t = 1,
# one step in the middle, the last one up to t = 981.
_INVERSION_PAIRS = ((0, 1), (481, 501), (961, 981))


def _alpha_bar(t: int) -> torch.Tensor:
    """alpha_bar_t of SD's schedule as a 0-d float32 tensor (what the loops pass to a step)."""
    return _ALPHAS_CUMPROD[t].clone()


# ----------------------------------------------------------------------------------------------------------
# Exercise 11.1: inpainting's blending step
# ----------------------------------------------------------------------------------------------------------

def reference_blend_latents(x: torch.Tensor, original: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                            alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """Latent blending (Avrahami et al. 2023, sec. 3): the sampler's x where the mask is 1 (repaint), the original
    latents noised to the next step's level where it is 0 (keep). As `blend` in sd/editing/inpaint.py, written
    again here on purpose (the learner's version beside the package's); alpha_bar_next = 1 after the last step."""
    known = q_sample(original, noise, alpha_bar_next)        # Ho et al. 2020, eq. 4, at the next step's level
    return mask * x + (1 - mask) * known


def _blend_cases() -> list[Case]:
    """x after a step, the original latents, the run's noise and a 0/1 latent mask, at three levels of a run."""
    levels = (_alpha_bar(961), _alpha_bar(481), torch.tensor(1.0))      # early, middle, after the last step
    cases = []
    with seeded(90):
        for j, alpha_bar_next in enumerate(levels):
            batch, h, w = (2, 6, 8) if j % 2 == 0 else (1, 8, 8)
            mask = torch.zeros(1, 1, h, w)
            mask[..., h // 4: 3 * h // 4, w // 2:] = 1                  # repaint a block on the right
            cases.append(Case({"x": randn(batch, 4, h, w), "original": randn(1, 4, h, w),
                               "noise": randn(batch, 4, h, w), "mask": mask, "alpha_bar_next": alpha_bar_next}))
    return cases


def check_blend_latents(fn) -> bool:
    """Exercise 11.1: fn(x, original, noise, mask, alpha_bar_next) -> the latents with the kept region put back."""
    def wrong(kind):
        def compute(ref, c):
            x, original, noise, mask, alpha_bar = c.inputs.values()
            known = {"no_sqrt": alpha_bar * original + (1 - alpha_bar) * noise,
                     "swapped_weights": (1 - alpha_bar) ** 0.5 * original + alpha_bar ** 0.5 * noise,
                     "clean": original,
                     "noise_only": noise}.get(kind, q_sample(original, noise, alpha_bar))
            if kind == "inverted":
                return (1 - mask) * x + mask * known
            return mask * x + (1 - mask) * known
        return compute

    mistakes = [
        Mistake("the mask is the wrong way round: 1 (white) is repainted, so keep the sampler's x where the mask "
                "is 1 and put the original back where it is 0", wrong("inverted")),
        Mistake("the kept region gets the clean original latents: at this point of the run the rest of x is still "
                "noisy, so noise the original to the next step's level first (alpha_bar_next)", wrong("clean")),
        Mistake("the original is noised without the square roots: q(x_t | x_0) is sqrt(alpha_bar) x_0 + "
                "sqrt(1 - alpha_bar) noise", wrong("no_sqrt")),
        Mistake("the two weights of the noising are swapped: the original gets sqrt(alpha_bar) and the noise "
                "sqrt(1 - alpha_bar)", wrong("swapped_weights")),
        Mistake("the kept region gets the noise alone: it is the original latents, noised to the next step's "
                "level", wrong("noise_only")),
    ]
    return check_function("check_blend_latents", fn, reference_blend_latents, _blend_cases(), mistakes,
                          hint="known = sqrt(alpha_bar_next) * original + sqrt(1 - alpha_bar_next) * noise; "
                               "return mask * x + (1 - mask) * known",
                          reference_name="latent blending, Avrahami et al. 2023 (reference_blend_latents)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 11.2: one DDIM inversion step
# ----------------------------------------------------------------------------------------------------------

def reference_ddim_inversion_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                                  alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """DDIM's deterministic update (Song et al. 2021, eq. 12, eta = 0) taken from the less noisy alpha_bar_t up to
    the noisier alpha_bar_next: x_0 from x_t and eps, then x_0 noised with that same eps (Mokady et al. 2023)."""
    pred_x0 = predict_x0(x_t, eps, alpha_bar_t)              # Ho et al. 2020, eq. 15
    return alpha_bar_next ** 0.5 * pred_x0 + (1 - alpha_bar_next) ** 0.5 * eps


def _inversion_cases() -> list[Case]:
    cases = []
    with seeded(91):
        for j, (t, t_next) in enumerate(_INVERSION_PAIRS):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 4, 8, 8)
            cases.append(Case({"x_t": randn(*shape), "eps": randn(*shape), "alpha_bar_t": _alpha_bar(t),
                               "alpha_bar_next": _alpha_bar(t_next)}))
    return cases


def check_ddim_inversion_step(fn) -> bool:
    """Exercise 11.2: fn(x_t, eps, alpha_bar_t, alpha_bar_next) -> x at the noisier level alpha_bar_next."""
    def wrong(kind):
        def compute(ref, c):
            x_t, eps, alpha_bar_t, alpha_bar_next = c.inputs.values()
            if kind == "swapped":
                return reference_ddim_inversion_step(x_t, eps, alpha_bar_next, alpha_bar_t)
            pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
            return {"tuple": (reference_ddim_inversion_step(x_t, eps, alpha_bar_t, alpha_bar_next), pred_x0),
                    "x0": pred_x0,
                    "no_sqrt": alpha_bar_next * pred_x0 + (1 - alpha_bar_next) * eps,
                    "x0_no_sqrt": alpha_bar_next ** 0.5 * (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
                                  + (1 - alpha_bar_next) ** 0.5 * eps,
                    "no_eps": alpha_bar_next ** 0.5 * pred_x0}[kind]
        return compute

    mistakes = [
        Mistake("alpha_bar_t and alpha_bar_next are swapped: that is an ordinary (denoising) DDIM step; take x_0 "
                "from x_t at its own level alpha_bar_t, then go up to the noisier alpha_bar_next", wrong("swapped")),
        Mistake("this returns a tuple (x, predicted x_0), as notebook 07's DDIM step does: return the latent at "
                "the noisier level only", wrong("tuple")),
        Mistake("this is the predicted x_0: go on and noise it to alpha_bar_next with the same eps",
                wrong("x0")),
        Mistake("the square roots are missing: x_next = sqrt(alpha_bar_next) x_0 + sqrt(1 - alpha_bar_next) eps",
                wrong("no_sqrt")),
        Mistake("predicted x_0 divides by alpha_bar_t: the square root is missing, "
                "x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)", wrong("x0_no_sqrt")),
        Mistake("the noise term is missing: DDIM with eta = 0 puts the same eps back, "
                "sqrt(alpha_bar_next) x_0 + sqrt(1 - alpha_bar_next) eps", wrong("no_eps")),
    ]
    return check_function("check_ddim_inversion_step", fn, reference_ddim_inversion_step, _inversion_cases(),
                          mistakes,
                          hint="pred_x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t); "
                               "return sqrt(alpha_bar_next) pred_x0 + sqrt(1 - alpha_bar_next) eps",
                          reference_name="DDIM inversion, Song et al. 2021 eq. 12 (reference_ddim_inversion_step)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 11.3: slerp
# ----------------------------------------------------------------------------------------------------------

def _parallel_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """a and b = 2a with entries +-0.5 and +-1 over 64 numbers: cos(angle) is exactly 1 in float32 and float64
    (a.b = 32, |a| = 4, |b| = 8), so an implementation without a fallback divides 0 by 0."""
    signs = torch.where(randn(4, 4, 4) > 0, 1.0, -1.0)
    return 0.5 * signs, signs


def _slerp_cases() -> list[Case]:
    with seeded(92):
        cases = [Case({"a": randn(1, 4, 8, 8), "b": randn(1, 4, 8, 8), "t": 0.3}),
                 Case({"a": randn(4, 6, 6), "b": 2 * randn(4, 6, 6), "t": 0.5}),
                 Case({"a": randn(1, 4, 8, 8), "b": randn(1, 4, 8, 8), "t": 0.85})]
        a, b = _parallel_pair()
        cases.append(Case({"a": a, "b": b, "t": 0.25}))                 # parallel: slerp is the straight line
    return cases


def _slerp_formula(a: torch.Tensor, b: torch.Tensor, t: float, *, normalise: bool = True, swap_ends: bool = False,
                   divide: bool = True) -> torch.Tensor:
    """Shoemake's slerp without a fallback for parallel vectors, in float64, with one part done a chosen way."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos_w = a64 @ b64 / (a64.norm() * b64.norm()) if normalise else a64 @ b64
    w = torch.arccos(cos_w)                                  # NaN when |cos_w| > 1 (not normalised)
    wa, wb = (torch.sin(t * w), torch.sin((1 - t) * w)) if swap_ends else (torch.sin((1 - t) * w), torch.sin(t * w))
    out = wa * a64 + wb * b64
    out = out / torch.sin(w) if divide else out
    return out.reshape(a.shape).to(a.dtype)


def check_slerp(fn) -> bool:
    """Exercise 11.3: fn(a, b, t) -> the point a fraction t along the great circle from a (t = 0) to b (t = 1)."""
    def wrong(**how):
        return lambda ref, c: _slerp_formula(*c.inputs.values(), **how)

    mistakes = [
        Mistake("this is plain linear interpolation (1 - t) a + t b: follow the great circle, "
                "sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b", lambda ref, c: lerp(*c.inputs.values())),
        Mistake("no fallback for parallel vectors: when the angle w is (nearly) 0, sin(w) is 0 and the formula "
                "divides 0 by 0; use the straight line (1 - t) a + t b there", wrong()),
        Mistake("the angle comes from the dot product of unnormalised vectors: divide a . b by |a| |b| before the "
                "arccos (the dot product alone is far outside [-1, 1], and arccos gives NaN)", wrong(normalise=False)),
        Mistake("t is applied to the wrong end: at t = 0 the result must be a, so a gets sin((1 - t) w) and b "
                "gets sin(t w)", wrong(swap_ends=True)),
        Mistake("the division by sin(w) is missing: sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b",
                wrong(divide=False)),
    ]
    return check_function("check_slerp", fn, slerp, _slerp_cases(), mistakes,
                          hint="w = arccos(a . b / (|a| |b|)) over all the numbers of the tensors; if w is tiny "
                               "return (1 - t) a + t b, else (sin((1 - t) w) a + sin(t w) b) / sin(w)")
