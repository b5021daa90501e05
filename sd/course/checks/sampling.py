"""Checks for notebook 07 (sampling): the DDPM step, the DDIM step, classifier-free guidance, the sampling loop.

Each check compares with `sd.samplers` (the update rules, and the loops of a whole run) or with the guidance of
`sd.diffusion.DiffusionScheduler.sample`; the `Mistake`s recompute the reference the typical wrong ways (a missing
square root, alpha_bar_t where alpha_bar_prev belongs, the final alpha_bar set to 1, cond and uncond swapped,
timesteps without SD's offset, ...), so a wrong answer is named, not just reported. Every message is words and
maths: the code is only printed by solution("7.N").
"""
from __future__ import annotations

import contextlib
import io

import torch

from ...diffusion import DiffusionScheduler
from ...samplers import (MIN_DDPM_VARIANCE, SAMPLING_LOOPS, ddim_step, ddpm_step, noise_levels, predict_x0,
                         randn as draw_noise)
from .common import Case, Mistake, _compare, _more_help, check_function, randn, require_callable, seeded

# SD v1's schedule: the alpha_bar_t the cases below take their values from.
_ALPHAS_CUMPROD = DiffusionScheduler().alphas_cumprod
# (t, t_prev) pairs of a 50-step SD run: the noisiest step, one in the middle, the last (which ends on alpha_bar_0).
_STEP_PAIRS = ((981, 961), (501, 481), (1, 0))
# SD v1's inference timesteps are shifted by one ("steps_offset": 1 in its scheduler config).
_STEPS_OFFSET = 1


def _alpha_bar(t: int) -> torch.Tensor:
    """alpha_bar_t of SD's schedule as a 0-d float32 tensor (what the samplers pass to a step)."""
    return _ALPHAS_CUMPROD[t].clone()


def _step_cases(seed: int, with_noise: bool, onto_x0: bool = False) -> list[Case]:
    """Random x_t, eps (and noise) at the timesteps of _STEP_PAIRS; shapes (B, 4, h, w) like SD's latents.

    onto_x0 adds DDPM's last step, from t = 1 onto alpha_bar = 1 (x_0 itself).
    """
    cases = []
    pairs = [(_alpha_bar(t), _alpha_bar(t_prev)) for t, t_prev in _STEP_PAIRS]
    if onto_x0:
        pairs.append((_alpha_bar(1), torch.tensor(1.0)))
    with seeded(seed):
        for j, (alpha_bar_t, alpha_bar_prev) in enumerate(pairs):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 4, 8, 8)
            inputs = {"x_t": randn(*shape), "eps": randn(*shape),
                      "alpha_bar_t": alpha_bar_t, "alpha_bar_prev": alpha_bar_prev}
            if with_noise:
                inputs["noise"] = randn(*shape)
            cases.append(Case(inputs))
    return cases


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.1: the DDPM step, from the posterior
# ----------------------------------------------------------------------------------------------------------

def _ddpm_wrong(x_t, eps, alpha_bar_t, alpha_bar_prev, noise, *, variance: str = "posterior", sqrt_std: bool = True,
                alpha_t_is_bar: bool = False, x0_sqrt: bool = True, add_noise: bool = True,
                vote_variance: str = "right"):
    """Ho et al.'s DDPM step with one thing done a chosen wrong way (the right way: the defaults)."""
    alpha_t = alpha_bar_t if alpha_t_is_bar else alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    if x0_sqrt:
        pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
    else:
        pred_x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
    if vote_variance != "right":
        # the two Gaussian votes on x_prev, combined by precision, with the x_t vote's variance taken wrong
        var_t = {"beta": beta_t, "beta_alpha2": beta_t / alpha_t ** 2, "precision": beta_t / alpha_t}[vote_variance]
        var_0 = 1 - alpha_bar_prev
        var = 1 / (1 / var_t + 1 / var_0)
        mu = var * (x_t / alpha_t ** 0.5 / var_t + alpha_bar_prev ** 0.5 * pred_x0 / var_0)
        return mu + var ** 0.5 * noise, pred_x0
    mu = (alpha_bar_prev ** 0.5 * beta_t / (1 - alpha_bar_t)) * pred_x0 \
        + (alpha_t ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
    var = {"posterior": (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t,   # beta_tilde_t, the right one
           "beta": beta_t}[variance]
    var = torch.as_tensor(var).clamp(min=MIN_DDPM_VARIANCE)
    std = var ** 0.5 if sqrt_std else var
    return (mu + std * noise if add_noise else mu), pred_x0


def check_ddpm_step(fn) -> bool:
    """Exercise 7.1: fn(x_t, eps, alpha_bar_t, alpha_bar_prev, noise) -> (x_prev, pred_x0), Ho et al. 2020, eq. 6-7."""
    def wrong(**how):
        return lambda ref, c: _ddpm_wrong(*c.inputs.values(), **how)

    def swapped_alphas(ref, c):
        x_t, eps, alpha_bar_t, alpha_bar_prev, noise = c.inputs.values()
        return ddpm_step(x_t, eps, alpha_bar_prev, alpha_bar_t, noise)

    def prev_is_t(ref, c):
        x_t, eps, alpha_bar_t, _, noise = c.inputs.values()
        return ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_t, noise)

    mistakes = [
        Mistake("the variance is beta_t (Ho et al.'s 'fixed large' choice): SD's DDPM adds the posterior's own "
                "variance, which is smaller, beta_tilde = beta_t (1 - alpha_bar_prev) / (1 - alpha_bar_t)",
                wrong(variance="beta")),
        Mistake("the noise is multiplied by the posterior's variance: multiply it by its standard deviation, "
                "the square root", wrong(sqrt_std=False)),
        Mistake("the noise is multiplied by beta_t: take the posterior's variance, then its square root",
                wrong(variance="beta", sqrt_std=False)),
        Mistake("no noise is added: DDPM samples from the posterior, its mean plus its standard deviation times "
                "the noise (only the mean is deterministic)", wrong(add_noise=False)),
        Mistake("predicted x_0 divides by alpha_bar_t: the square root is missing; x_t = sqrt(alpha_bar_t) x_0 + "
                "sqrt(1 - alpha_bar_t) eps, solved for x_0", wrong(x0_sqrt=False)),
        Mistake("the step's own alpha_t is taken as alpha_bar_t: with skipped timesteps the jump from t to t' has "
                "alpha_t = alpha_bar_t / alpha_bar_prev (and beta_t = 1 - alpha_t)", wrong(alpha_t_is_bar=True)),
        Mistake("the vote of x_t on x_prev has variance beta_t: read q(x_t | x_prev) = N(sqrt(alpha_t) x_prev, "
                "beta_t) as a Gaussian in x_prev, centred at x_t / sqrt(alpha_t); dividing by sqrt(alpha_t) "
                "divides the variance by alpha_t, so it is beta_t / alpha_t", wrong(vote_variance="beta")),
        Mistake("the vote of x_t on x_prev has variance beta_t / alpha_t^2: dividing x_t by sqrt(alpha_t) divides "
                "the variance by alpha_t (the square of sqrt(alpha_t)), not by alpha_t^2",
                wrong(vote_variance="beta_alpha2")),
        Mistake("NaN where the step lands on x_0 itself (alpha_bar_prev = 1, DDPM's last step): the clue from x_0 "
                "has variance 0 there, and 1 / 0 precisions give NaN; combine the clues as variance v_t v_0 / "
                "(v_t + v_0) and mean (m_t v_0 + m_0 v_t) / (v_t + v_0), the same numbers without dividing by v_0",
                wrong(vote_variance="precision")),
        Mistake("alpha_bar_t is used where alpha_bar_prev belongs (beta_t is 0 then and x_t comes back "
                "unchanged): the step goes from alpha_bar_t to alpha_bar_prev", prev_is_t),
        Mistake("alpha_bar_t and alpha_bar_prev are swapped: alpha_bar_t is the noisier one (smaller), "
                "alpha_t = alpha_bar_t / alpha_bar_prev < 1", swapped_alphas),
    ]
    return check_function("check_ddpm_step", fn, ddpm_step, _step_cases(10, with_noise=True, onto_x0=True), mistakes,
                          exercise="7.1", reference_name="sd's DDPM step (Ho et al. 2020, eq. 6 and 7)",
                          hint="the posterior of x_prev combines two Gaussian votes, one from x_t and one from "
                               "the predicted x_0, by their precisions; give back the sample and the predicted x_0")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.2: the DDIM step, predict x_0 then noise it again
# ----------------------------------------------------------------------------------------------------------

def _ddim_wrong(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None, *, sqrt_prev: bool = True,
                sqrt_dir: bool = True, x0_sqrt: bool = True, sigma_in_dir: bool = True, add_noise: bool = True,
                sqrt_sigma: bool = True, inverted_ratio: bool = False, fresh_direction: bool = False):
    """DDIM (Song et al. 2021, eq. 12 and 16) with one thing done a chosen wrong way (the right way: the defaults)."""
    if x0_sqrt:
        pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
    else:
        pred_x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
    ratio = alpha_bar_prev / alpha_bar_t if inverted_ratio else alpha_bar_t / alpha_bar_prev
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - ratio)
    sigma_t = eta * (var ** 0.5 if sqrt_sigma else var)
    dir_sq = 1 - alpha_bar_prev - (sigma_t ** 2 if sigma_in_dir else 0)
    direction = noise if (fresh_direction and noise is not None) else eps
    dir_xt = (dir_sq ** 0.5 if sqrt_dir else dir_sq) * direction
    x_prev = (alpha_bar_prev ** 0.5 if sqrt_prev else alpha_bar_prev) * pred_x0 + dir_xt
    if noise is not None and add_noise and not fresh_direction:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def check_ddim_step(fn) -> bool:
    """Exercise 7.2: fn(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None) -> (x_prev, pred_x0)."""
    cases = _step_cases(11, with_noise=False)   # eta = 0: deterministic, no noise given
    with seeded(12):
        for j, (t, t_prev) in enumerate(_STEP_PAIRS[:2]):
            shape = (2, 4, 6, 5)
            cases.append(Case({"x_t": randn(*shape), "eps": randn(*shape), "alpha_bar_t": _alpha_bar(t),
                               "alpha_bar_prev": _alpha_bar(t_prev), "eta": (1.0, 0.5)[j], "noise": randn(*shape)}))

    def wrong(**how):
        return lambda ref, c: _ddim_wrong(**{**c.inputs, **how})

    def prev_is_t(ref, c):
        return ddim_step(**{**c.inputs, "alpha_bar_prev": c.inputs["alpha_bar_t"]})

    def ddpm_instead(ref, c):
        inputs = c.inputs
        if inputs.get("noise") is None:
            return None
        return ddpm_step(inputs["x_t"], inputs["eps"], inputs["alpha_bar_t"], inputs["alpha_bar_prev"],
                         inputs["eta"] * inputs["noise"])

    mistakes = [
        Mistake("alpha_bar_t is used where alpha_bar_prev belongs, so x_t comes back unchanged: noise the "
                "predicted x_0 again to the NEXT level, alpha_bar_prev", prev_is_t),
        Mistake("the square root of alpha_bar_prev is missing: at level alpha_bar_prev the clean part is "
                "sqrt(alpha_bar_prev) x_0, as in the forward process", wrong(sqrt_prev=False)),
        Mistake("the square root of the noise's coefficient is missing: the noise part at level alpha_bar_prev has "
                "standard deviation sqrt(1 - alpha_bar_prev - sigma_t^2), the square root of its variance",
                wrong(sqrt_dir=False)),
        Mistake("predicted x_0 divides by alpha_bar_t: the square root is missing; x_t = sqrt(alpha_bar_t) x_0 + "
                "sqrt(1 - alpha_bar_t) eps, solved for x_0", wrong(x0_sqrt=False)),
        Mistake("eta is ignored: with eta > 0 a part sigma_t^2 = eta^2 beta_tilde of the variance 1 - alpha_bar_prev "
                "comes from fresh noise, the rest from the predicted noise", wrong(eta=0.0)),
        Mistake("sigma_t^2 is not taken out of the predicted noise's part: with fresh noise of variance sigma_t^2 "
                "added, the predicted noise carries only 1 - alpha_bar_prev - sigma_t^2, so that the total stays "
                "1 - alpha_bar_prev", wrong(sigma_in_dir=False)),
        Mistake("the fresh noise is missing: with eta > 0, add sigma_t times the noise (Song et al.'s "
                "'random noise' term)", wrong(add_noise=False)),
        Mistake("the fresh noise replaces the predicted noise in the direction term: keep the predicted noise "
                "(with variance 1 - alpha_bar_prev - sigma_t^2) and add sigma_t times the fresh noise",
                wrong(fresh_direction=True)),
        Mistake("sigma_t lacks its square root: sigma_t^2 = eta^2 beta_tilde, the posterior's variance of 7.1 "
                "times eta squared (Song et al. 2021, eq. 16)", wrong(sqrt_sigma=False)),
        Mistake("in sigma_t the ratio is inverted: the jump's beta is 1 - alpha_bar_t / alpha_bar_prev (positive, "
                "since alpha_bar_t < alpha_bar_prev); 1 - alpha_bar_prev / alpha_bar_t is negative, its square root "
                "NaN", wrong(inverted_ratio=True)),
        Mistake("this is the DDPM step with the noise scaled by eta: DDIM noises the predicted x_0 again with the "
                "predicted noise, and adds fresh noise only for the part sigma_t^2 of the variance",
                ddpm_instead),
    ]
    return check_function("check_ddim_step", fn, ddim_step, cases, mistakes, exercise="7.2",
                          reference_name="sd's DDIM step (Song et al. 2021, eq. 12 and 16)",
                          hint="predict x_0, then build the sample at level alpha_bar_prev the way the forward "
                               "process does, from x_0 and noise, with the predicted noise carrying all of the "
                               "noise's variance but sigma_t^2; give back the sample and the predicted x_0")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.3: classifier-free guidance
# ----------------------------------------------------------------------------------------------------------

class ToyUNet:
    """A stand-in for the UNet: unet(x, context, t) -> eps, per sample, and it records every call.

    Its output depends on each sample's own context (so cond and uncond give different eps) and on t.
    """

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, float]] = []

    def __repr__(self) -> str:
        return "toy_unet"

    def __call__(self, latent: torch.Tensor, context: torch.Tensor, timestep) -> torch.Tensor:
        if latent.dim() != 4 or context.dim() != 3:
            raise ValueError(f"unet(x, context, t) expects x (B, 4, h, w) and context (B, 77, D), "
                             f"got {tuple(latent.shape)} and {tuple(context.shape)}")
        if context.shape[0] != latent.shape[0]:
            raise ValueError(f"the UNet got x with batch {latent.shape[0]} but context with batch "
                             f"{context.shape[0]}: give it as many contexts as latents")
        t = torch.as_tensor(timestep, dtype=latent.dtype)
        self.calls.append((latent.shape[0], context.detach().clone(), float(t)))
        # (B, 77, D) -> (B, 1, 1, 1): one number per sample from its own text
        text = context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + context[:, :1, :1, None].reshape(-1, 1, 1, 1)
        return torch.tanh(latent * (1 + t / 1000) + 3 * text)


def reference_guidance(unet, x, t, context, uncond_context, guidance_scale):
    """The guidance of sd.diffusion.DiffusionScheduler.sample: one batch, uncond first (Ho & Salimans 2022)."""
    if guidance_scale <= 1:
        return unet(x, context, t)
    # (B, 4, h, w) -> (2B, 4, h, w) -> two (B, 4, h, w) halves
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _guidance_cases() -> list[Case]:
    with seeded(13):
        cases = []
        for b, scale in ((1, 7.5), (2, 3.0), (2, 12.0)):
            cases.append(Case({"unet": ToyUNet(), "x": randn(b, 4, 6, 6), "t": torch.tensor(501),
                               "context": randn(b, 77, 16), "uncond_context": randn(b, 77, 16),
                               "guidance_scale": scale}))
        return cases


def _structure_problem(fn) -> str | None:
    """What is wrong with the learner's UNet calls (not one batch of 2B, or cond first), if anything."""
    with seeded(14):
        unet, x, context, uncond = ToyUNet(), randn(2, 4, 6, 6), randn(2, 77, 16), randn(2, 77, 16)
    try:
        fn(unet, x, torch.tensor(501), context, uncond, 7.5)
    except NotImplementedError:
        raise
    except Exception:
        return None   # the value check below reports the crash, with the inputs
    if len(unet.calls) != 1:
        return (f"your function called the UNet {len(unet.calls)} times for one guided step: give it both "
                "predictions' inputs as ONE batch of 2B (the latent twice, the two contexts stacked along the "
                "batch) and split its output into its two halves; one pass of the UNet, not two")
    batch, seen, _ = unet.calls[0]
    if batch != 2 * x.shape[0]:
        return f"the UNet got a batch of {batch}, expected 2B = {2 * x.shape[0]} (x twice: uncond and cond)"
    first, second = seen.chunk(2)
    if torch.equal(first, context) and torch.equal(second, uncond):
        return ("the batch puts the conditional half first: SD's code, diffusers and sd/diffusion.py put the "
                "unconditional context first (the empty prompt's, then the prompt's), and the first half of the "
                "output is then the unconditional prediction")
    return None


def check_classifier_free_guidance(fn) -> bool:
    """Exercise 7.3: fn(unet, x, t, context, uncond_context, guidance_scale) -> guided eps, one UNet pass."""
    require_callable("check_classifier_free_guidance", fn)
    problem = _structure_problem(fn)
    if problem is not None:
        raise AssertionError(f"check_classifier_free_guidance failed: {problem}" + _more_help("7.3"))

    def parts(c):
        unet, x, t, context, uncond, g = c.inputs.values()
        eps_u, eps_c = unet(x, uncond, t), unet(x, context, t)
        return eps_u, eps_c, g

    def wrong(formula):
        return lambda ref, c: formula(*parts(c))

    mistakes = [
        Mistake("cond and uncond are swapped: the guided noise starts from the UNCONDITIONAL prediction and moves "
                "g times the difference towards the conditional one; and the first half of the UNet's output "
                "belongs to the first half of the contexts (the unconditional one)",
                wrong(lambda u, c, g: c + g * (u - c))),
        Mistake("the guidance starts from eps_cond: with g the guidance scale, eps_uncond + g (eps_cond - "
                "eps_uncond); eps_cond + w (eps_cond - eps_uncond) is the same with w = g - 1, not with w = g",
                wrong(lambda u, c, g: c + g * (c - u))),
        Mistake("the base term is missing: start from eps_uncond, then add g (eps_cond - eps_uncond)",
                wrong(lambda u, c, g: g * (c - u))),
        Mistake("the scale multiplies eps_cond only (eps_uncond + g eps_cond - eps_uncond = g eps_cond): the "
                "scale multiplies the whole difference eps_cond - eps_uncond", wrong(lambda u, c, g: g * c)),
        Mistake("the scale multiplies the wrong term: eps_uncond + g (eps_cond - eps_uncond), the scale on the "
                "difference only", wrong(lambda u, c, g: g * u + (c - u))),
        Mistake("guidance_scale is ignored: this is eps_cond alone", wrong(lambda u, c, g: c)),
        Mistake("this is eps_uncond alone: mix both, eps_uncond + g (eps_cond - eps_uncond)",
                wrong(lambda u, c, g: u)),
        Mistake("the guidance has the gradient of log p(c | x) with the wrong sign: the classifier's term pushes "
                "towards the prompt, eps_uncond + g (eps_cond - eps_uncond)",
                wrong(lambda u, c, g: u - g * (c - u))),
    ]
    return check_function("check_classifier_free_guidance", fn, reference_guidance, _guidance_cases(), mistakes,
                          exercise="7.3", reference_name="the guidance in sd.diffusion.DiffusionScheduler.sample",
                          hint="the guided noise is the unconditional prediction plus g times the implicit "
                               "classifier's term, the difference of the two predictions")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.4: the sampling loop, with guidance, on SD's timesteps
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_sampler(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method="ddim",
                      eta=0.0, generator=None):
    """What sd runs: sd.samplers' DDIM or DDPM loop on SD's noise levels, guided as DiffusionScheduler.sample.

    Returns (the final latents, [(t, x_t, predicted x_0) at each step]).
    """
    levels = noise_levels(method, alphas_cumprod, steps)
    trajectory = []

    def predict_noise(x, t):
        return reference_guidance(unet, x, t, context, uncond_context, guidance_scale)

    options = {"eta": eta} if method == "ddim" else {}
    out = SAMPLING_LOOPS[method](predict_noise, x_T, levels, generator=generator, **options,
                                 callback=lambda i, t, x, x0: trajectory.append((int(t), x, x0)))
    return out, trajectory


def _timesteps_wrong(alphas_cumprod, steps, how):
    """A run's timesteps, computed a chosen wrong way."""
    T = len(alphas_cumprod)
    k = T // steps
    return {"no_offset": torch.arange(steps - 1, -1, -1) * k,
            "linspace": torch.linspace(T - 1, 0, steps).round().long(),
            "ascending": torch.arange(0, steps) * k + _STEPS_OFFSET}[how]


def _loop(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method="ddim", eta=0.0,
          generator=None, *, timesteps: str = "right", final: str = "right", prev: str = "next",
          swap_contexts: bool = False, scale: float | None = None, frozen_x: bool = False,
          ddpm_noise: str = "fresh"):
    """The sampling loop with one thing done a chosen wrong way (the right way: the defaults)."""
    T = len(alphas_cumprod)
    if timesteps == "right":
        ts = torch.arange(steps - 1, -1, -1) * (T // steps) + _STEPS_OFFSET
    else:
        ts = _timesteps_wrong(alphas_cumprod, steps, timesteps)
    right_final = alphas_cumprod[0] if method == "ddim" else torch.tensor(1.0)
    last = {"right": right_final, "one": torch.tensor(1.0), "alpha0": alphas_cumprod[0]}[final]
    if prev == "next":
        alpha_bar_prev = torch.cat([alphas_cumprod[ts[1:]], last.reshape(1)])
    elif prev == "same":
        alpha_bar_prev = alphas_cumprod[ts]
    else:   # "train_step": one training step back, as if the run visited every timestep
        alpha_bar_prev = alphas_cumprod[(ts - 1).clamp(min=0)]
        if ts[-1] == 0:
            alpha_bar_prev[-1] = last
    c, u = (uncond_context, context) if swap_contexts else (context, uncond_context)
    g = guidance_scale if scale is None else scale
    x, once = x_T, None
    for i, t in enumerate(ts):
        eps = reference_guidance(unet, x, t, c, u, g) if g > 1 else unet(x, c, t)
        if method == "ddpm":
            if ddpm_noise == "none":
                noise = torch.zeros_like(x)
            else:
                noise = draw_noise(x.shape, generator, x.dtype, x.device)
                if ddpm_noise == "once":
                    once = noise if once is None else once
                    noise = once
            x_prev, _ = ddpm_step(x, eps, alphas_cumprod[t], alpha_bar_prev[i], noise)
        else:
            noise = draw_noise(x.shape, generator, x.dtype, x.device) if eta > 0 else None
            x_prev, _ = ddim_step(x, eps, alphas_cumprod[t], alpha_bar_prev[i], eta, noise)
        if not frozen_x:
            x = x_prev
        else:
            x = x_T if i < len(ts) - 1 else x_prev
    return x


def _sampler_cases() -> list[Case]:
    """Four runs on SD's schedule with the toy UNet: DDIM at 10 and 7 steps, DDPM, DDIM with eta = 0.5."""
    cases = []
    with seeded(15):
        for b, steps, g, method, eta, seed in ((1, 10, 7.5, "ddim", 0.0, 0), (2, 7, 3.0, "ddim", 0.0, 1),
                                               (1, 6, 7.5, "ddpm", 0.0, 2), (2, 5, 5.0, "ddim", 0.5, 3)):
            cases.append(Case({"unet": ToyUNet(), "x_T": randn(b, 4, 5, 5), "context": randn(b, 77, 16),
                               "uncond_context": randn(b, 77, 16), "alphas_cumprod": _ALPHAS_CUMPROD.clone(),
                               "steps": steps, "guidance_scale": g, "method": method, "eta": eta, "seed": seed}))
    return cases


def _seeded_call(fn):
    """fn with the generator made from the case's seed (each call its own, so the learner and sd draw alike)."""
    def call(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method, eta, seed):
        out = fn(unet, x_T, context, uncond_context, alphas_cumprod, steps=steps, guidance_scale=guidance_scale,
                 method=method, eta=eta, generator=torch.Generator().manual_seed(seed))
        return out[0] if isinstance(out, tuple) and len(out) == 2 else out
    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "your_sampler")
    call.__module__ = getattr(fn, "__module__", "?")
    return call


def _trajectory_problem(fn) -> str | None:
    """What is wrong with the trajectory the learner's loop returns (its timesteps, its length), if anything."""
    case = _sampler_cases()[0]
    inputs = dict(case.inputs)
    seed = inputs.pop("seed")
    expected_out, expected = reference_sampler(**inputs, generator=torch.Generator().manual_seed(seed))
    out = fn(**inputs, generator=torch.Generator().manual_seed(seed))
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list)):
        return ("your sampler should give back a pair, the final latents and the trajectory (a list with one "
                f"(t, x_t, predicted x_0) triple per step), got {type(out).__name__}")
    trajectory = out[1]
    if len(trajectory) != len(expected):
        return f"the trajectory has {len(trajectory)} entries for a run of {len(expected)} steps: one per step"
    ts = [int(entry[0]) for entry in trajectory]
    if ts != [t for t, _, _ in expected]:
        return f"the trajectory's timesteps are {ts}, expected {[t for t, _, _ in expected]}"
    for i, (entry, (t, x, x0)) in enumerate(zip(trajectory, expected)):
        for j, (got, want, what) in enumerate(((entry[1], x, "x_t (the latent the step starts from)"),
                                              (entry[2], x0, "the predicted x_0"))):
            problem, _ = _compare(got, want, "sd's", 1e-4, 1e-3, what=f"step {i + 1}'s {what}")
            if problem is not None:
                return problem
    return None


def check_sampling_loop(fn) -> bool:
    """Exercise 7.4: fn(unet, x_T, context, uncond_context, alphas_cumprod, steps, guidance_scale, method="ddim",
    eta=0.0, generator=None) -> (latents, trajectory), against sd's DDIM and DDPM loops on a toy UNet."""
    require_callable("check_sampling_loop", fn)

    def wrong(**how):
        def compute(ref, c):
            inputs = {**c.inputs, **how}
            seed = inputs.pop("seed")
            return _loop(**inputs, generator=torch.Generator().manual_seed(seed))
        return compute

    mistakes = [
        Mistake("the timesteps lack SD's offset of 1: a run of n steps visits every (T // n)-th timestep, from the "
                "noisiest, each shifted up by 1 (10 steps: 901, 801, ..., 1, not 900, ..., 0)",
                wrong(timesteps="no_offset")),
        Mistake("the timesteps are spread evenly from 999 to 0 (the 'linspace' spacing of notebook 04): SD's run "
                "visits every (T // n)-th timestep plus 1, from the noisiest ('leading' spacing)",
                wrong(timesteps="linspace")),
        Mistake("the timesteps go upwards: the run starts at the noisiest timestep and walks down to 1",
                wrong(timesteps="ascending")),
        Mistake("the last DDIM step lands on alpha_bar = 1: SD's DDIM ends on alpha_bar_0, the first entry of the "
                "schedule (its config has set_alpha_to_one false)", wrong(final="one")),
        Mistake("the last DDPM step lands on alpha_bar_0: SD's DDPM sampler lets its last step land on x_0 itself, "
                "alpha_bar = 1 (only DDIM ends on alpha_bar_0)", wrong(final="alpha0")),
        Mistake("each step goes from alpha_bar_t to alpha_bar_t itself: it goes to the NEXT timestep of the run",
                wrong(prev="same")),
        Mistake("each step goes one training step back (t - 1): the run jumps T // n training steps at once, to "
                "the next timestep of the run", wrong(prev="train_step")),
        Mistake("the prompt's context and the empty prompt's are swapped in the guidance call: the guidance "
                "pushes AWAY from the prompt", wrong(swap_contexts=True)),
        Mistake("the guidance scale is not used: every step predicts the noise with the prompt only (g = 1)",
                wrong(scale=1.0)),
        Mistake("every step starts from x_T again: the latent each step returns is where the next one starts",
                wrong(frozen_x=True)),
        Mistake("the DDPM steps add no fresh noise: DDPM draws new noise at every step (from the generator)",
                wrong(ddpm_noise="none")),
        Mistake("the DDPM steps reuse one noise draw: draw new noise at every step", wrong(ddpm_noise="once")),
        Mistake("eta is ignored (or the noise is not drawn): with eta > 0 every DDIM step draws fresh noise from "
                "the generator", wrong(eta=0.0)),
    ]
    passed = io.StringIO()
    with contextlib.redirect_stdout(passed):   # the pass line only once the trajectory is right too
        check_function("check_sampling_loop", _seeded_call(fn), _seeded_call(reference_sampler), _sampler_cases(),
                       mistakes, exercise="7.4", reference_name="sd's DDIM and DDPM samplers (sd.samplers)",
                       hint="each step asks the guided UNet at the run's timestep t, then steps from alpha_bar_t "
                            "to the alpha_bar of the next timestep (after the last: alpha_bar_0 for DDIM, 1 for "
                            "DDPM)", atol=1e-4, rtol=1e-3)
    problem = _trajectory_problem(fn)
    if problem is not None:
        raise AssertionError(f"check_sampling_loop failed: the final latents match sd's, but {problem}"
                             + _more_help("7.4"))
    print(passed.getvalue(), end="")
    return True
