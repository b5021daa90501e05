"""Checks for notebook 07 (sampling): the DDPM step, the DDIM step, the alpha_bar_prev of a run, guidance.

Each check compares with `sd.samplers` (the update rules and the noise levels of a DDIM run) or with the guidance
line of `sd.diffusion.DiffusionScheduler.sample`; the `Mistake`s recompute the reference the typical wrong ways
(a missing square root, alpha_bar_t where alpha_bar_prev belongs, the final alpha_bar set to 1, cond and uncond
swapped, ...), so a wrong answer is named, not just reported.
"""
from __future__ import annotations

import torch

from ...diffusion import DiffusionScheduler
from ...samplers import MIN_DDPM_VARIANCE, ddim_step, ddpm_step, leading_timesteps, noise_levels, predict_x0
from .common import Case, Mistake, check_function, randn, require_callable, seeded

# SD v1's schedule: the alpha_bar_t the cases below take their values from.
_ALPHAS_CUMPROD = DiffusionScheduler().alphas_cumprod
# (t, t_prev) pairs of a 50-step SD run: the noisiest step, one in the middle, the last (which ends on alpha_bar_0).
_STEP_PAIRS = ((981, 961), (501, 481), (1, 0))


def _alpha_bar(t: int) -> torch.Tensor:
    """alpha_bar_t of SD's schedule as a 0-d float32 tensor (what the samplers pass to a step)."""
    return _ALPHAS_CUMPROD[t].clone()


def _step_cases(seed: int, with_noise: bool) -> list[Case]:
    """Random x_t, eps (and noise) at the timesteps of _STEP_PAIRS; shapes (B, 4, h, w) like SD's latents."""
    cases = []
    with seeded(seed):
        for j, (t, t_prev) in enumerate(_STEP_PAIRS):
            shape = (2, 4, 5, 6) if j % 2 == 0 else (1, 4, 8, 8)
            inputs = {"x_t": randn(*shape), "eps": randn(*shape),
                      "alpha_bar_t": _alpha_bar(t), "alpha_bar_prev": _alpha_bar(t_prev)}
            if with_noise:
                inputs["noise"] = randn(*shape)
            cases.append(Case(inputs))
    return cases


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.1: the DDPM step
# ----------------------------------------------------------------------------------------------------------

def _ddpm_wrong(x_t, eps, alpha_bar_t, alpha_bar_prev, noise, *, variance: str = "posterior", sqrt_std: bool = True,
                alpha_t_is_bar: bool = False, x0_sqrt: bool = True, add_noise: bool = True):
    """Ho et al.'s DDPM step with one thing done a chosen wrong way (the right way: the defaults)."""
    alpha_t = alpha_bar_t if alpha_t_is_bar else alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    if x0_sqrt:
        pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
    else:
        pred_x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
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
        Mistake("the variance is beta_t (Ho et al.'s 'fixed large' choice): SD's DDPM adds the posterior variance "
                "beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t (eq. 7)", wrong(variance="beta")),
        Mistake("the noise is multiplied by the variance beta_tilde_t: multiply it by the standard deviation "
                "sqrt(beta_tilde_t)", wrong(sqrt_std=False)),
        Mistake("the noise is multiplied by beta_t, not by sqrt(beta_tilde_t): take the posterior variance "
                "(1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t, then its square root",
                wrong(variance="beta", sqrt_std=False)),
        Mistake("no noise is added: DDPM samples x_prev = mu + sqrt(beta_tilde_t) * noise (only the mean is "
                "deterministic)", wrong(add_noise=False)),
        Mistake("predicted x_0 divides by alpha_bar_t: the square root is missing, "
                "x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)", wrong(x0_sqrt=False)),
        Mistake("the mean uses alpha_bar_t where the step's own alpha_t belongs: with skipped timesteps "
                "alpha_t = alpha_bar_t / alpha_bar_prev (and beta_t = 1 - alpha_t)", wrong(alpha_t_is_bar=True)),
        Mistake("alpha_bar_t is used where alpha_bar_prev belongs (beta_t is 0 then and x_t comes back "
                "unchanged): the step goes from alpha_bar_t to alpha_bar_prev", prev_is_t),
        Mistake("alpha_bar_t and alpha_bar_prev are swapped: alpha_bar_t is the noisier one (smaller), "
                "alpha_t = alpha_bar_t / alpha_bar_prev < 1", swapped_alphas),
    ]
    return check_function("check_ddpm_step", fn, ddpm_step, _step_cases(10, with_noise=True), mistakes,
                          hint="pred_x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t); alpha_t = "
                               "alpha_bar_t / alpha_bar_prev, beta_t = 1 - alpha_t; mu = sqrt(alpha_bar_prev) beta_t / "
                               "(1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t; "
                               "x_prev = mu + sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t) noise; "
                               "return (x_prev, pred_x0)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.2: the DDIM step
# ----------------------------------------------------------------------------------------------------------

def _ddim_wrong(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None, *, sqrt_prev: bool = True,
                sqrt_dir: bool = True, x0_sqrt: bool = True, sigma_in_dir: bool = True, add_noise: bool = True,
                sqrt_sigma: bool = True, inverted_ratio: bool = False):
    """DDIM (Song et al. 2021, eq. 12 and 16) with one thing done a chosen wrong way (the right way: the defaults)."""
    if x0_sqrt:
        pred_x0 = predict_x0(x_t, eps, alpha_bar_t)
    else:
        pred_x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t
    ratio = alpha_bar_prev / alpha_bar_t if inverted_ratio else alpha_bar_t / alpha_bar_prev
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - ratio)
    sigma_t = eta * (var ** 0.5 if sqrt_sigma else var)
    dir_sq = 1 - alpha_bar_prev - (sigma_t ** 2 if sigma_in_dir else 0)
    dir_xt = (dir_sq ** 0.5 if sqrt_dir else dir_sq) * eps
    x_prev = (alpha_bar_prev ** 0.5 if sqrt_prev else alpha_bar_prev) * pred_x0 + dir_xt
    if noise is not None and add_noise:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def check_ddim_step(fn) -> bool:
    """Exercise 7.2: fn(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None) -> (x_prev, pred_x0)."""
    cases = _step_cases(11, with_noise=False)   # eta = 0: deterministic, noise=None
    with seeded(12):
        for j, (t, t_prev) in enumerate(_STEP_PAIRS[:2]):
            shape = (2, 4, 6, 5)
            cases.append(Case({"x_t": randn(*shape), "eps": randn(*shape), "alpha_bar_t": _alpha_bar(t),
                               "alpha_bar_prev": _alpha_bar(t_prev), "eta": (1.0, 0.5)[j], "noise": randn(*shape)}))

    def wrong(**how):
        return lambda ref, c: _ddim_wrong(**{**c.inputs, **how})

    def prev_is_t(ref, c):
        return ddim_step(**{**c.inputs, "alpha_bar_prev": c.inputs["alpha_bar_t"]})

    mistakes = [
        Mistake("alpha_bar_t is used where alpha_bar_prev belongs, so x_t comes back unchanged: x_prev = "
                "sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps", prev_is_t),
        Mistake("the square root of alpha_bar_prev is missing: x_prev = sqrt(alpha_bar_prev) * pred_x0 + ...",
                wrong(sqrt_prev=False)),
        Mistake("the square root of the direction's coefficient is missing: 'direction pointing to x_t' is "
                "sqrt(1 - alpha_bar_prev - sigma_t^2) * eps", wrong(sqrt_dir=False)),
        Mistake("predicted x_0 divides by alpha_bar_t: the square root is missing, "
                "x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)", wrong(x0_sqrt=False)),
        Mistake("eta is ignored: with eta > 0, sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) "
                "* (1 - alpha_bar_t / alpha_bar_prev)) takes sigma_t^2 out of the direction and adds sigma_t * noise",
                wrong(eta=0.0)),
        Mistake("sigma_t^2 is not taken out of the direction: with eta > 0 the direction is "
                "sqrt(1 - alpha_bar_prev - sigma_t^2) * eps, so that the total variance stays 1 - alpha_bar_prev",
                wrong(sigma_in_dir=False)),
        Mistake("the noise is missing: with eta > 0, add sigma_t * noise (eq. 12's 'random noise' term)",
                wrong(add_noise=False)),
        Mistake("sigma_t lacks its square root: sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) "
                "* (1 - alpha_bar_t / alpha_bar_prev)), Song et al. 2021, eq. 16", wrong(sqrt_sigma=False)),
        Mistake("in sigma_t the ratio is inverted: it is 1 - alpha_bar_t / alpha_bar_prev (positive, since "
                "alpha_bar_t < alpha_bar_prev); 1 - alpha_bar_prev / alpha_bar_t is negative, its square root NaN",
                wrong(inverted_ratio=True)),
    ]
    return check_function("check_ddim_step", fn, ddim_step, cases, mistakes,
                          hint="pred_x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t); sigma_t = eta * "
                               "sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)); "
                               "x_prev = sqrt(alpha_bar_prev) pred_x0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps "
                               "(+ sigma_t * noise when noise is given); return (x_prev, pred_x0)")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.3: alpha_bar_prev of every step of a run
# ----------------------------------------------------------------------------------------------------------

def reference_previous_alpha_bars(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What sd's DDIM sampler steps to: the alpha_bar after each step of a run of as many steps on this schedule."""
    levels = noise_levels("ddim", alphas_cumprod, len(timesteps))
    if not torch.equal(levels.timesteps, timesteps):   # the cases only pass SD's own "leading" timesteps
        raise ValueError("the check's timesteps must be SD's leading timesteps")
    return levels.alpha_bars[1:]


def check_previous_alpha_bars(fn) -> bool:
    """Exercise 7.3: fn(alphas_cumprod (T,), timesteps (n,)) -> alpha_bar at each step's next timestep (n,)."""
    # a short schedule whose T is not a multiple of n, so a step size computed the wrong way shows
    short = torch.cumprod(1 - torch.linspace(1e-3, 0.05, 100), dim=0)
    cases = [Case({"alphas_cumprod": _ALPHAS_CUMPROD.clone(), "timesteps": leading_timesteps(n, len(_ALPHAS_CUMPROD))})
             for n in (10, 50)]
    cases.append(Case({"alphas_cumprod": short, "timesteps": leading_timesteps(7, len(short))}))

    def wrong(which):
        def compute(ref, c):
            ac, ts = c.inputs.values()
            step = len(ac) // len(ts)
            return {"one": torch.cat([ac[ts[1:]], torch.ones(1)]),
                    "same": ac[ts],
                    "train_step": ac[ts - 1],
                    "noisier": torch.cat([torch.ones(1), ac[ts[:-1]]]),
                    "wraps": ac[ts - step],
                    "zero_last": torch.cat([ac[ts[1:]], torch.zeros(1)])}[which]
        return compute

    mistakes = [
        Mistake("the last step ends on alpha_bar = 1: SD's DDIM ends on alpha_bar_0 = alphas_cumprod[0] "
                "(its scheduler config has set_alpha_to_one = False; diffusers' default True is not SD's)",
                wrong("one")),
        Mistake("the last step's previous timestep is negative and the index wraps around to the end of the "
                "schedule (alphas_cumprod[-k] is the noisiest alpha_bar): after the last step use alphas_cumprod[0]",
                wrong("wraps")),
        Mistake("this is alpha_bar_t itself: alpha_bar_prev belongs to the NEXT timestep of the run "
                "(timesteps[i + 1]), the less noisy one", wrong("same")),
        Mistake("this is the previous training step t - 1: with num_inference_steps < T the run jumps "
                "T // n steps at once, so alpha_bar_prev is alphas_cumprod[timesteps[i + 1]]", wrong("train_step")),
        Mistake("this looks backwards (timesteps[i - 1], the noisier step): the run goes from t to the next, "
                "smaller timestep, timesteps[i + 1]", wrong("noisier")),
        Mistake("the last step ends on alpha_bar = 0 (pure noise): it ends on alpha_bar_0 = alphas_cumprod[0], "
                "nearly clean", wrong("zero_last")),
    ]
    return check_function("check_previous_alpha_bars", fn, reference_previous_alpha_bars, cases, mistakes,
                          reference_name="sd.samplers.noise_levels('ddim', ...).alpha_bars[1:]",
                          hint="alphas_cumprod[timesteps[1:]], then alphas_cumprod[0] for the last step "
                               "(torch.cat them); the result has one value per timestep")


# ----------------------------------------------------------------------------------------------------------
# Exercise 7.4: classifier-free guidance
# ----------------------------------------------------------------------------------------------------------

class ToyUNet:
    """A stand-in for the UNet: unet(x, context, t) -> eps, per sample, and it records every call.

    Its output depends on each sample's own context (so cond and uncond give different eps) and on t.
    """

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __repr__(self) -> str:
        return "toy_unet"

    def __call__(self, latent: torch.Tensor, context: torch.Tensor, timestep) -> torch.Tensor:
        if latent.dim() != 4 or context.dim() != 3:
            raise ValueError(f"unet(x, context, t) expects x (B, 4, h, w) and context (B, 77, D), "
                             f"got {tuple(latent.shape)} and {tuple(context.shape)}")
        if context.shape[0] != latent.shape[0]:
            raise ValueError(f"the UNet got x with batch {latent.shape[0]} but context with batch "
                             f"{context.shape[0]}: give it as many contexts as latents")
        self.calls.append((latent.shape[0], context.detach().clone()))
        t = torch.as_tensor(timestep, dtype=latent.dtype)
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
        return (f"your function called the UNet {len(unet.calls)} times for one guided step: run both halves as "
                "ONE batch of 2B, unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t), and split the "
                "output with .chunk(2) (one pass of the UNet, not two)")
    batch, seen = unet.calls[0]
    if batch != 2 * x.shape[0]:
        return f"the UNet got a batch of {batch}, expected 2B = {2 * x.shape[0]} (x twice: uncond and cond)"
    first, second = seen.chunk(2)
    if torch.equal(first, context) and torch.equal(second, uncond):
        return ("the batch puts the conditional half first: SD's code, diffusers and sd/diffusion.py put the "
                "unconditional half first, torch.cat([uncond_context, context]), and split the output as "
                "eps_uncond, eps_cond = out.chunk(2)")
    return None


def check_classifier_free_guidance(fn) -> bool:
    """Exercise 7.4: fn(unet, x, t, context, uncond_context, guidance_scale) -> guided eps, one UNet pass."""
    require_callable("check_classifier_free_guidance", fn)
    problem = _structure_problem(fn)
    if problem is not None:
        raise AssertionError(f"check_classifier_free_guidance failed: {problem}")

    def parts(c):
        unet, x, t, context, uncond, g = c.inputs.values()
        eps_u, eps_c = unet(x, uncond, t), unet(x, context, t)
        return eps_u, eps_c, g

    def wrong(formula):
        return lambda ref, c: formula(*parts(c))

    mistakes = [
        Mistake("cond and uncond are swapped: eps = eps_uncond + g * (eps_cond - eps_uncond) starts from the "
                "UNCONDITIONAL prediction and moves towards the conditional one; and the first half of the UNet's "
                "output belongs to the first half of the contexts (uncond): eps_uncond, eps_cond = out.chunk(2)",
                wrong(lambda u, c, g: c + g * (u - c))),
        Mistake("the guidance starts from eps_cond: with g the guidance scale, eps = eps_uncond + g * "
                "(eps_cond - eps_uncond) (eps_cond + g * (...) is the w-form, with w = g - 1)",
                wrong(lambda u, c, g: c + g * (c - u))),
        Mistake("the base term is missing: eps = eps_uncond + g * (eps_cond - eps_uncond), not g * (eps_cond - "
                "eps_uncond)", wrong(lambda u, c, g: g * (c - u))),
        Mistake("the scale multiplies eps_cond only (eps_uncond + g * eps_cond - eps_uncond = g * eps_cond): "
                "put the difference in parentheses, g * (eps_cond - eps_uncond)", wrong(lambda u, c, g: g * c)),
        Mistake("the scale multiplies the wrong term: eps_uncond + g * (eps_cond - eps_uncond), the scale on the "
                "difference only", wrong(lambda u, c, g: g * u + (c - u))),
        Mistake("guidance_scale is ignored: this is eps_cond alone", wrong(lambda u, c, g: c)),
        Mistake("this is eps_uncond alone: mix both, eps_uncond + g * (eps_cond - eps_uncond)",
                wrong(lambda u, c, g: u)),
    ]
    return check_function("check_classifier_free_guidance", fn, reference_guidance, _guidance_cases(), mistakes,
                          reference_name="the guidance in sd.diffusion.DiffusionScheduler.sample",
                          hint="eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([uncond_context, "
                               "context]), t).chunk(2); return eps_uncond + guidance_scale * (eps_cond - eps_uncond)")
