"""Checks for the editing notebook (11): the inpainting loop, the DDIM inversion loop, slerp.

The references are written here after the papers and are proved in tests/test_checks_editing.py to be what `sd`
and diffusers compute: the inpainting loop gives `sd.editing.inpaint.inpaint`'s latents (and its blend is
diffusers' inpainting blend with `add_noise`), the inversion loop gives `sd.editing.inversion.invert`'s noise (and
each of its steps is diffusers' DDIMInverseScheduler.step), and slerp is `sd.editing.interpolation.slerp` itself.
The loops are checked with a toy noise predictor that depends on the latent and on the timestep, so a step taken
at the wrong level or with the wrong timestep shows. The `Mistake`s recompute them the typical wrong ways (the mask
the wrong way round, the blend at the level the step starts from, the steps undone in the wrong order, the
noise predicted at the wrong timestep, plain lerp, ...), so a wrong answer is named.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...diffusion import DiffusionScheduler
from ...editing.interpolation import lerp, slerp
from ...samplers import ddim_step, predict_x0, q_sample
from .common import Case, Mistake, check_function, randn, seeded

# SD v1's schedule: the noise levels the cases take their values from.
_SCHEDULER = DiffusionScheduler()
# The step counts of the loops' cases: a short run, one of notebook 11's, SD's usual count.
_LOOP_STEPS = (4, 10, 25)


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in for the UNet's noise prediction: it depends on the latent, nonlinearly on the timestep, and on each
    pixel's neighbours and the whole latent's mean (as a UNet's convolutions and attention do), so that what the
    blend writes into the kept region reaches the repainted one."""
    t = float(t)
    neighbours = x.roll(1, dims=-1) + x.roll(-1, dims=-2)                   # (B, C, h, w)
    return (0.5 * torch.tanh(x) + 0.2 * neighbours + 0.1 * x.mean(dim=(-2, -1), keepdim=True)
            + 0.3 * torch.sin(torch.tensor(t / 90.0)) + t / 2000)


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, alpha_bar_from: torch.Tensor,
               alpha_bar_to: torch.Tensor) -> torch.Tensor:
    """DDIM's update with eta = 0 (Song et al. 2021, eq. 12) from one level to another, down or up: x_0 from x and
    eps, then noised to the other level with that same eps."""
    return q_sample(predict_x0(x, eps, alpha_bar_from), eps, alpha_bar_to)


def _levels(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (n,), alpha_bars (n + 1,)) of an SD v1 DDIM run: step i goes from level i to level i + 1."""
    levels = _SCHEDULER.noise_levels(steps, "ddim")
    return levels.timesteps.clone(), levels.alpha_bars.clone()


# ----------------------------------------------------------------------------------------------------------
# Exercise 11.1: the inpainting loop (DDIM with a blend after every step)
# ----------------------------------------------------------------------------------------------------------

def _blend(x, original, noise, mask, alpha_bar):
    """The sampler's x where the mask is 1 (repaint), the original noised to alpha_bar where it is 0 (keep)."""
    return mask * x + (1 - mask) * q_sample(original, noise, alpha_bar)      # q(x_t | x_0), Ho et al. 2020, eq. 4


def reference_inpainting_loop(eps_fn: Callable, noise: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                              timesteps: torch.Tensor, alpha_bars: torch.Tensor) -> torch.Tensor:
    """Latent blending (Avrahami et al. 2023, sec. 3): DDIM from the noise, and after every step the kept region
    (mask 0) overwritten by the original latents noised with the run's noise to the level the step reached; after
    the last step, the original itself. As sd/editing/inpaint.py, written again here on purpose."""
    x = noise                                                                 # x_T: (B, 4, h, w)
    n = len(timesteps)
    for i in range(n):
        eps = eps_fn(x, timesteps[i])
        x, _ = ddim_step(x, eps, alpha_bars[i], alpha_bars[i + 1])           # Song et al. 2021, eq. 12
        reached = alpha_bars[i + 1] if i + 1 < n else torch.ones(())        # after the last step: no noise left
        x = _blend(x, original, noise, mask, reached)
    return x


def _inpainting_cases() -> list[Case]:
    cases = []
    with seeded(90):
        for j, steps in enumerate(_LOOP_STEPS):
            batch, h, w = (2, 6, 8) if j % 2 == 0 else (1, 8, 8)
            mask = torch.zeros(1, 1, h, w)
            mask[..., h // 4: 3 * h // 4, w // 2:] = 1                      # repaint a block on the right
            timesteps, alpha_bars = _levels(steps)
            cases.append(Case({"eps_fn": toy_eps, "noise": randn(batch, 4, h, w), "original": randn(1, 4, h, w),
                               "mask": mask, "timesteps": timesteps, "alpha_bars": alpha_bars}))
    return cases


def _inpainting_variant(kind: str):
    """The reference loop done one typical wrong way."""
    def compute(ref, case):
        eps_fn, noise, original, mask, timesteps, alpha_bars = case.inputs.values()
        n = len(timesteps)
        x = noise
        for i in range(n):
            if kind == "blend_first":
                x = _blend(x, original, noise, mask, alpha_bars[i])
            eps = eps_fn(x, timesteps[i])
            x, _ = ddim_step(x, eps, alpha_bars[i], alpha_bars[i + 1])
            reached = alpha_bars[i + 1] if i + 1 < n else torch.ones(())
            if kind == "blend_first":
                continue
            if kind == "start_level":
                reached = alpha_bars[i]
            elif kind == "last_not_clean":
                reached = alpha_bars[i + 1]
            if kind == "inverted":
                x = (1 - mask) * x + mask * q_sample(original, noise, reached)
            elif kind == "clean":
                x = mask * x + (1 - mask) * original
            elif kind == "predicted_noise":
                x = _blend(x, original, eps, mask, reached)
            elif kind == "no_sqrt":
                x = mask * x + (1 - mask) * (reached * original + (1 - reached) * noise)
            else:
                x = _blend(x, original, noise, mask, reached)
        return x
    return compute


def check_inpainting_loop(fn) -> bool:
    """Exercise 11.1: fn(eps_fn, noise, original, mask, timesteps, alpha_bars) -> the inpainted latents."""
    mistakes = [
        Mistake("the mask is the wrong way round: 1 (white) is repainted, so keep the sampler's latent where the "
                "mask is 1 and put the noised original back where it is 0", _inpainting_variant("inverted")),
        Mistake("the kept region gets the clean original latents at every step: the rest of the latent is still "
                "noisy then, so noise the original to the level the step has just reached", _inpainting_variant("clean")),
        Mistake("the original is noised to the level the step starts from: after step i the latent is at level "
                "i + 1, so the kept region must be noised to that level", _inpainting_variant("start_level")),
        Mistake("after the last step the kept region is still noised (to the final alpha_bar, that of t = 0): "
                "there the sampler's latent is clean, so put the original back without noise (alpha_bar = 1)",
                _inpainting_variant("last_not_clean")),
        Mistake("the blend comes before the step: then the step itself moves the kept region, and the result's "
                "kept part is not the original; blend after each step", _inpainting_variant("blend_first")),
        Mistake("the original is noised with the step's predicted noise: use the run's own noise, the one x_T was "
                "drawn as, at every step", _inpainting_variant("predicted_noise")),
        Mistake("the original is noised without the square roots: q(x_t | x_0) is the square root of alpha_bar "
                "times x_0 plus the square root of one minus alpha_bar times the noise", _inpainting_variant("no_sqrt")),
    ]
    return check_function("check_inpainting_loop", fn, reference_inpainting_loop, _inpainting_cases(), mistakes,
                          hint="start from the noise; at every step predict the noise, take the DDIM step to the "
                               "next level, then put back the original, noised with the run's noise to that level "
                               "(clean after the last step), where the mask is 0",
                          reference_name="latent blending, Avrahami et al. 2023 (reference_inpainting_loop)",
                          exercise="11.1")


# ----------------------------------------------------------------------------------------------------------
# Exercise 11.2: the DDIM inversion loop
# ----------------------------------------------------------------------------------------------------------

def reference_ddim_inversion(eps_fn: Callable, x0: torch.Tensor, timesteps: torch.Tensor,
                             alpha_bars: torch.Tensor) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, sec. 4.3 and 5.4; Mokady et al. 2023): the sampler's steps undone from
    the last to the first; step i (level i -> i + 1, timestep t_i) is undone by eq. 12 taken from level i + 1 up to
    level i, with the noise predicted at t_i on the latent it starts from. As sd/editing/inversion.py."""
    x = x0                                                                    # at the final level, alpha_bars[n]
    for i in reversed(range(len(timesteps))):
        eps = eps_fn(x, timesteps[i])                                         # at the step's own timestep
        x = _ddim_move(x, eps, alpha_bars[i + 1], alpha_bars[i])            # eq. 12 with the levels swapped: up
    return x


def _inversion_cases() -> list[Case]:
    cases = []
    with seeded(91):
        for j, steps in enumerate(_LOOP_STEPS):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 4, 8, 8)
            timesteps, alpha_bars = _levels(steps)
            cases.append(Case({"eps_fn": toy_eps, "x0": randn(*shape), "timesteps": timesteps,
                               "alpha_bars": alpha_bars}))
    return cases


def _inversion_variant(kind: str):
    """The reference loop done one typical wrong way."""
    def compute(ref, case):
        eps_fn, x, timesteps, alpha_bars = case.inputs.values()
        n = len(timesteps)
        order = range(n) if kind == "forward" else reversed(range(1 if kind == "early_stop" else 0, n))
        for i in order:
            t = timesteps[i]
            if kind == "start_timestep":
                t = timesteps[i + 1] if i + 1 < n else torch.zeros((), dtype=timesteps.dtype)
            eps = eps_fn(x, t)
            low, high = alpha_bars[i + 1], alpha_bars[i]
            if kind == "from_one" and i == n - 1:
                low = torch.ones(())
            if kind == "swapped":
                low, high = high, low
            x = _ddim_move(x, eps, low, high)
        return x
    return compute


def check_inversion_loop(fn) -> bool:
    """Exercise 11.2: fn(eps_fn, x0, timesteps, alpha_bars) -> x_T, from which DDIM redraws x0."""
    mistakes = [
        Mistake("the steps are undone in the sampler's order: inversion starts at the clean end, so undo the last "
                "step first (from level n up to level n - 1) and step 0 last", _inversion_variant("forward")),
        Mistake("each step goes down in noise, as the sampler does: to undo step i, go from the less noisy level "
                "i + 1 up to the noisier level i (the DDIM update with its two levels exchanged)",
                _inversion_variant("swapped")),
        Mistake("the noise is predicted at the timestep of the level the latent sits at: the sampler's step i "
                "predicted at its own timestep t_i, so undoing it predicts at t_i too (on the less noisy latent, "
                "the approximation of DDIM inversion)", _inversion_variant("start_timestep")),
        Mistake("the loop stops one step early: undo all n steps, so that x_T sits at level 0 (the first "
                "timestep's)", _inversion_variant("early_stop")),
        Mistake("the picture's latents are taken to be at alpha_bar = 1: they sit at the run's final level "
                "(SD's DDIM ends at the alpha_bar of t = 0, not 1), the last entry of alpha_bars",
                _inversion_variant("from_one")),
    ]
    return check_function("check_inversion_loop", fn, reference_ddim_inversion, _inversion_cases(), mistakes,
                          hint="walk the sampler's steps from the last to the first; for step i predict the noise "
                               "at its timestep on the current latent, then take the DDIM update from level i + 1 "
                               "up to level i",
                          reference_name="DDIM inversion, Song et al. 2021 (reference_ddim_inversion)",
                          exercise="11.2")


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
                   divide: bool = True, per_sample: bool = False) -> torch.Tensor:
    """Shoemake's slerp without a fallback for parallel vectors, in float64, with one part done a chosen way."""
    if per_sample:                                           # one angle per item of the first dimension
        return torch.stack([_slerp_formula(x, y, t) for x, y in zip(a, b)])
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
        Mistake("the angle comes from the dot product of unnormalised vectors: divide a · b by |a| |b| before the "
                "arccos (the dot product alone is far outside [-1, 1], and arccos gives NaN)", wrong(normalise=False)),
        Mistake("t is applied to the wrong end: at t = 0 the result must be a, so a gets sin((1 - t) w) and b "
                "gets sin(t w)", wrong(swap_ends=True)),
        Mistake("the division by sin(w) is missing: sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b",
                wrong(divide=False)),
        Mistake("the angle is taken per item of the first dimension: take one angle over all the numbers of the "
                "two tensors", wrong(per_sample=True)),
    ]
    return check_function("check_slerp", fn, slerp, _slerp_cases(), mistakes,
                          hint="the angle w between a and b over all their numbers (arccos of their normalised "
                               "dot product); the weights sin((1 - t) w) / sin(w) for a and sin(t w) / sin(w) for "
                               "b; the straight line when w is (nearly) 0",
                          reference_name="sd.editing.interpolation.slerp", exercise="11.3")
