"""Checks for notebook 10 (training): the UNet's training loss, and the caption dropout of classifier-free guidance.

Both exercises draw random numbers, so both take a `torch.Generator`: the check runs the learner's function and
the reference with generators seeded alike and compares the results exactly (for the loss, also the gradients it
sends into the model's weights; the model is a small stand-in for the UNet, with the UNet's call). The references
are `sd.training.unet.diffusion_loss` and `sd.training.unet.drop_captions`, the code that trained the shipped
model, called with the exercises' signatures. The loss takes optional per-timestep weights (min-SNR weighting,
Hang et al. 2023), checked on batches with weights too. The `Mistake`s recompute the loss the typical wrong ways
(x_0 or x_t as the target, t drawn from [1, T], no latent scale, a wrong alpha_bar, the weights ignored or applied
to the batch's mean, ...) and the dropout the typical wrong ways (probability 1 - p, the whole batch at once, ...),
so a wrong answer is named, not just reported.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LATENT_SCALE
from ...diffusion import DiffusionScheduler, min_snr_weights
from ...training.data import caption_for, training_combinations
from ...training.unet import CAPTION_DROPOUT, diffusion_loss, drop_captions
from ...timestep_embedding import timestep_embedding
from .common import ATOL, RTOL, Case, Mistake, randn, require_callable, seeded

# The checks call the learner's loss with a small stand-in for the UNet (see _NoisePredictor); its weights are
# the same in every call, so gradients can be compared.
_PREDICTOR_SEED = 8
_CONTEXT_DIM = 8
_TIME_FEATURES = 16
# Gradients are sums over every pixel of the batch: compare them relative to their largest entry.
_GRAD_RTOL = 1e-3
_GRAD_ATOL_FRACTION = 1e-5
SHIPPED_LATENT_SCALE = 0.4532       # about the shipped model's measured scale (SD v1's: LATENT_SCALE = 0.18215)
_LATENT_STD = 2.0                   # unscaled VAE latents are wider than N(0, 1): that is what the scale is for
_SHORT_T = 100                      # a second schedule of 100 steps, so that T = 1000 cannot be hard-coded


_WEIGHT_HINT = ("the loss takes an optional last argument weight=None: a (T,) tensor of per-timestep weights "
                "(min-SNR weighting); without it, the plain mean squared error")


def _hint_line(hint: str | None) -> str:
    return f"\n  Hint: {hint}" if hint else ""


# ----------------------------------------------------------------------------------------------------------
# Exercise 10.1: the UNet's training loss
# ----------------------------------------------------------------------------------------------------------

def reference_unet_training_loss(unet, latents: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                                 latent_scale: float, generator: torch.Generator,
                                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """sd.training.unet.diffusion_loss on latents * latent_scale, with exercise 10.1's signature."""
    scheduler = DiffusionScheduler(num_train_timesteps=len(alphas_cumprod))
    scheduler.alphas_cumprod = alphas_cumprod
    return diffusion_loss(unet, scheduler, latents * latent_scale, context, generator, weight=weight)


def _wrong_loss(unet, latents, context, alphas_cumprod, latent_scale, generator, *, target: str = "noise",
                t_range: str = "right", noise_first: bool = False, scale: str = "multiply", coef: str = "right",
                shift: int = 0, reshape: bool = True, one_t: bool = False, reduction: str = "mean", weight=None,
                weighting: str = "right"):
    """The loss with one thing done a chosen wrong way (the defaults are the right way)."""
    b, n = latents.shape[0], len(alphas_cumprod)
    z0 = {"multiply": latents * latent_scale, "none": latents, "divide": latents / latent_scale}[scale]
    low, high = {"right": (0, n), "one_to_T": (1, n + 1), "one_to_T_minus_1": (1, n)}[t_range]
    size = (1,) if one_t else (b,)
    if noise_first:
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(low, high, size, generator=generator)
    else:
        t = torch.randint(low, high, size, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
    ab = alphas_cumprod[t + shift]                          # IndexError when t + shift = T: mistake skipped
    if reshape:
        ab = ab.view(-1, 1, 1, 1)
    signal, noise_coef = {"right": (ab.sqrt(), (1 - ab).sqrt()), "no_sqrt": (ab, 1 - ab),
                          "swapped": ((1 - ab).sqrt(), ab.sqrt()), "variance": (ab.sqrt(), 1 - ab)}[coef]
    z_t = signal * z0 + noise_coef * noise
    pred = unet(z_t, context, t)
    goal = {"noise": noise, "x0": z0, "z_t": z_t}[target]
    if weight is None or weighting == "ignored":
        return F.mse_loss(pred, goal, reduction=reduction)
    if weighting == "after_mean":                                  # mean(weight[t]) * the batch's mean error
        return weight[t].mean() * F.mse_loss(pred, goal)
    if weighting == "not_reshaped":                                # weight[t] (B,) broadcast along the width
        return ((pred - goal) ** 2 * weight[t]).mean()
    per_sample = ((pred - goal) ** 2).flatten(1).mean(dim=1)       # (B,)
    return (weight[t] * per_sample).mean()


class _NoisePredictor(nn.Module):
    """A stand-in for the UNet with its call, unet(z_t, context, t) -> (B, 4, h, w), linear in z_t.

    A real (random) UNet would do, but its GroupNorms make it almost blind to the scale of z_t, so a latent
    scale divided instead of multiplied, or a missing square root, would change the loss by too little to tell.
    """

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(_TIME_FEATURES, channels)
        self.text_proj = nn.Linear(_CONTEXT_DIM, channels)

    def forward(self, z_t: torch.Tensor, context: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).expand(z_t.shape[0])                                  # (B,)
        time = self.time_proj(timestep_embedding(t, _TIME_FEATURES))                  # (B, 16) -> (B, 4)
        text = self.text_proj(context.mean(dim=1)).expand(z_t.shape[0], -1)          # (B, T, 8) -> (B, 4)
        return self.conv(z_t) + (time + text)[:, :, None, None]                      # (B, 4, h, w)


def _build_predictor() -> _NoisePredictor:
    with seeded(_PREDICTOR_SEED):
        return _NoisePredictor()


class _NotALoss(Exception):
    """The learner's function returned something that cannot be a training loss."""


def _loss_and_grads(fn: Callable, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's loss on the case (fresh stand-in UNet, fresh generator), and its weights' gradients as one vector."""
    unet = _build_predictor()
    inputs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.inputs.items()}
    generator = torch.Generator().manual_seed(inputs.pop("seed"))
    weight = inputs.pop("weight", None)
    with torch.enable_grad():
        loss = fn(unet, *inputs.values(), generator) if weight is None else \
            fn(unet, *inputs.values(), generator, weight=weight)
        if not isinstance(loss, torch.Tensor):
            raise _NotALoss(f"the loss should be a tensor, got {type(loss).__name__} {loss!r}"[:200]
                            + _hint_line("return the tensor F.mse_loss(...) itself, not loss.item(): "
                                         "the optimizer needs loss.backward()"))
        if loss.numel() != 1:
            raise _NotALoss(f"the loss should be one number (a 0-d tensor), got shape {tuple(loss.shape)}"
                            + _hint_line("average over the batch and every latent element: F.mse_loss(pred, noise) "
                                         "with its default reduction='mean'"))
        if not loss.requires_grad:
            raise _NotALoss("the loss carries no gradient back to the UNet's weights"
                            + _hint_line("don't compute the prediction under torch.no_grad() or .detach() it: "
                                         "the UNet learns through loss.backward()"))
        params = list(unet.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return loss.detach().reshape(()).float(), flat


def _loss_cases() -> list[Case]:
    """Random latents and contexts, the last two with per-timestep weights (min-SNR's, then random ones, batch 4 =
    width 4 again); the seeds are chosen so that no t = T - 1 is drawn (see the mistakes)."""
    sd_schedule = DiffusionScheduler().alphas_cumprod
    short_schedule = DiffusionScheduler(_SHORT_T, 1e-4, 0.02).alphas_cumprod   # T is not always 1000
    with seeded(80):
        # batch 4 = width 4: one alpha_bar per sample, if not reshaped to (B, 1, 1, 1), broadcasts along the
        # width and gives numbers (and a named mistake), not a crash
        return [Case({"latents": _LATENT_STD * randn(4, 4, 4, 4), "context": randn(4, 6, _CONTEXT_DIM),
                      "alphas_cumprod": sd_schedule, "latent_scale": LATENT_SCALE, "seed": 1}),
                Case({"latents": _LATENT_STD * randn(3, 4, 6, 6), "context": randn(3, 5, _CONTEXT_DIM),
                      "alphas_cumprod": sd_schedule, "latent_scale": SHIPPED_LATENT_SCALE, "seed": 2}),
                Case({"latents": _LATENT_STD * randn(5, 4, 4, 4), "context": randn(1, 5, _CONTEXT_DIM),
                      "alphas_cumprod": short_schedule, "latent_scale": 1 / 3, "seed": 3}),
                Case({"latents": _LATENT_STD * randn(4, 4, 4, 4), "context": randn(4, 6, _CONTEXT_DIM),
                      "alphas_cumprod": sd_schedule, "latent_scale": LATENT_SCALE, "seed": 4,
                      "weight": min_snr_weights(sd_schedule)}),
                Case({"latents": _LATENT_STD * randn(4, 4, 4, 4), "context": randn(4, 5, _CONTEXT_DIM),
                      "alphas_cumprod": short_schedule, "latent_scale": 1 / 3, "seed": 5,
                      "weight": 0.1 + torch.rand(_SHORT_T)})]


def _describe(case: Case) -> str:
    i = case.inputs
    weight = "" if i.get("weight") is None else f", weight = a ({len(i['weight'])},) tensor"
    return (f"latents {tuple(i['latents'].shape)}, context {tuple(i['context'].shape)}, "
            f"T = {len(i['alphas_cumprod'])}, latent_scale = {i['latent_scale']:.5g}, generator seeded {i['seed']}"
            + weight)


def _same_number(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, atol=ATOL, rtol=RTOL))


def check_unet_training_loss(fn) -> bool:
    """Exercise 10.1: fn(unet, latents, context, alphas_cumprod, latent_scale, generator, weight=None) -> SD's
    training loss; with weight (T,), each sample's mean squared error times weight[t], averaged over the batch."""
    name = "check_unet_training_loss"
    require_callable(name, fn)

    def wrong(**how):
        return lambda ref, c: _loss_and_grads(lambda *a, **k: _wrong_loss(*a, **k, **how), c)[0]

    mistakes = [
        Mistake("the target is the clean latent z0: SD's UNet predicts the NOISE (epsilon-prediction, Ho et al. "
                "2020, eq. 14): F.mse_loss(unet(z_t, context, t), noise)", wrong(target="x0")),
        Mistake("the target is the noisy latent z_t: the UNet must predict the noise that was added, "
                "F.mse_loss(unet(z_t, context, t), noise)", wrong(target="z_t")),
        Mistake("t is drawn from [1, T]: the training timesteps are 0, ..., T - 1 (alphas_cumprod[0] is the first "
                "noising step), torch.randint(0, T, (B,), generator=generator)", wrong(t_range="one_to_T")),
        Mistake("t is drawn from [1, T - 1]: t = 0 is a training timestep too, torch.randint(0, T, (B,), "
                "generator=generator)", wrong(t_range="one_to_T_minus_1")),
        Mistake("the latents are not multiplied by latent_scale: the UNet works on latents * latent_scale "
                "(SD v1: 0.18215), scaled to about unit variance like the noise", wrong(scale="none")),
        Mistake("the latents are divided by latent_scale: multiply, z0 = latents * latent_scale (decoding divides)",
                wrong(scale="divide")),
        Mistake("the noise is drawn before t: draw t first, then the noise, so that the same generator gives "
                "the same numbers as the reference", wrong(noise_first=True)),
        Mistake("one t for the whole batch: draw one timestep per sample, torch.randint(0, T, (B,), "
                "generator=generator), so each batch trains many noise levels", wrong(one_t=True)),
        Mistake("the square roots are missing: z_t = sqrt(alpha_bar_t) * z0 + sqrt(1 - alpha_bar_t) * noise",
                wrong(coef="no_sqrt")),
        Mistake("the noise is scaled by 1 - alpha_bar_t, a variance: scale it by sqrt(1 - alpha_bar_t)",
                wrong(coef="variance")),
        Mistake("the coefficients are swapped: z0 gets sqrt(alpha_bar_t), the noise sqrt(1 - alpha_bar_t)",
                wrong(coef="swapped")),
        Mistake("alpha_bar is taken at t - 1: use alphas_cumprod[t]", wrong(shift=-1)),
        Mistake("alpha_bar_t (shape (B,)) is not reshaped to (B, 1, 1, 1), so it broadcasts along the width: "
                "alphas_cumprod[t].view(-1, 1, 1, 1)", wrong(reshape=False)),
        Mistake("the loss is summed: take the mean over the batch and every latent element, F.mse_loss(pred, noise)",
                wrong(reduction="sum")),
        Mistake("the weights are ignored: with weight given, multiply each sample's mean squared error by "
                "weight[t] of its own timestep, then average over the batch", wrong(weighting="ignored")),
        Mistake("the weights multiply the batch's mean error (mean of weight[t] times F.mse_loss): weigh each "
                "sample's own error, ((pred - noise) ** 2).mean(dim=(1, 2, 3)) is (B,), then average "
                "weight[t] * that", wrong(weighting="after_mean")),
        Mistake("weight[t] (shape (B,)) multiplies the squared error (B, C, h, w) without a reshape, so it "
                "broadcasts along the width: average each sample's error to (B,) first, or use "
                "weight[t].view(-1, 1, 1, 1)", wrong(weighting="not_reshaped")),
    ]
    hint = ("draw t = torch.randint(0, T, (B,), generator=generator), then noise = torch.randn(z0.shape, "
            "generator=generator); z0 = latents * latent_scale; z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) "
            "noise; return F.mse_loss(unet(z_t, context, t), noise)")
    ref_name = "sd.training.unet.diffusion_loss"
    cases = _loss_cases()
    worst = 0.0
    with torch.random.fork_rng(devices=[]):
        for i, case in enumerate(cases):
            where = f"{name} failed on random input {i + 1} of {len(cases)} ({_describe(case)})"
            expected, expected_grads = _loss_and_grads(reference_unet_training_loss, case)
            try:
                got, grads = _loss_and_grads(fn, case)
                # a loss that differs may come from random numbers not drawn from the generator: run it again
                again = got if _same_number(got, expected) else _loss_and_grads(fn, case)[0]
            except NotImplementedError:
                raise
            except _NotALoss as e:
                raise AssertionError(f"{where}:\n  {e}") from None
            except IndexError as e:
                raise AssertionError(f"{where}: your code raised IndexError: {e}" + _hint_line(
                    "t must index alphas_cumprod: draw it from [0, T) with T = len(alphas_cumprod), "
                    "torch.randint(0, T, (B,), generator=generator); don't assume T = 1000")) from e
            except Exception as e:
                no_weight = isinstance(e, TypeError) and "weight" in str(e)     # a loss without the weight argument
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}"
                                     + _hint_line(_WEIGHT_HINT if no_weight else hint)) from e
            if not _same_number(got, again):
                raise AssertionError(f"{where}:\n  two calls with generators seeded alike gave two losses "
                                     f"({float(got):.6g} and {float(again):.6g})" + _hint_line(
                                         "draw every random number from the generator you are given: "
                                         "torch.randint(..., generator=generator), torch.randn(..., "
                                         "generator=generator); then training runs are reproducible"))
            if not _same_number(got, expected):
                named = next((m.hint for m in mistakes if _matches(m, case, got)), None)
                raise AssertionError(f"{where}:\n  the loss is {float(got):.6g}, {ref_name} gives "
                                     f"{float(expected):.6g}" + _hint_line(named or hint))
            scale = float(expected_grads.abs().max())
            if not torch.allclose(grads, expected_grads, rtol=_GRAD_RTOL, atol=_GRAD_ATOL_FRACTION * scale):
                diff = float((grads - expected_grads).abs().max())
                raise AssertionError(f"{where}:\n  the loss is right but the gradients in the UNet's weights differ "
                                     f"(max difference {diff:.3g}, largest gradient {scale:.3g})" + _hint_line(
                                         "compute the loss from the UNet's prediction as it is: no .detach(), "
                                         "no torch.no_grad(), nothing after F.mse_loss"))
            worst = max(worst, float((got - expected).abs()))
    print(f"✅ {name} passed: the same loss and gradients as {ref_name} on {len(cases)} random batches "
          f"(max diff {worst:.1g})")
    return True


def _matches(mistake: Mistake, case: Case, got: torch.Tensor) -> bool:
    try:
        return _same_number(got, mistake.compute(None, case))
    except Exception:
        return False       # this mistake cannot happen with this input (e.g. t = T drawn)


# ----------------------------------------------------------------------------------------------------------
# Exercise 10.2: caption dropout for classifier-free guidance
# ----------------------------------------------------------------------------------------------------------

def reference_drop_captions(captions: Sequence[str], generator: torch.Generator,
                            p: float = CAPTION_DROPOUT) -> list[str]:
    """The captions with each replaced by "" with probability p: the same draw as sd.training.unet.drop_captions."""
    # sd's drop_captions works on text states (B, T, C): give it ones for "kept", zeros for "the empty caption"
    kept = drop_captions(torch.ones(len(captions), 1, 1), torch.zeros(1, 1, 1), generator, p)   # (B, 1, 1)
    return [caption if keep else "" for caption, keep in zip(captions, kept.flatten().bool().tolist())]


def _wrong_drop(captions, seed, p, *, how: str):
    """The dropout done a typical wrong way, with a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    if how == "keep_p":            # rand < 1 - p: drops with probability 1 - p
        drop = torch.rand(len(captions), generator=generator) < 1 - p
    elif how == "greater":         # rand > p: also drops with probability 1 - p
        drop = torch.rand(len(captions), generator=generator) > p
    elif how == "whole_batch":     # one draw for all
        drop = (torch.rand(1, generator=generator) < p).expand(len(captions))
    elif how == "fixed_p":         # p ignored, always 0.1
        drop = torch.rand(len(captions), generator=generator) < CAPTION_DROPOUT
    else:
        raise ValueError(how)
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


_ONE_MINUS_P = ("this drops with probability 1 - p (90% of the captions when p = 0.1): drop where "
                "torch.rand(len(captions), generator=generator) < p, keep the others")


def _caption_cases() -> list[Case]:
    combos = training_combinations()
    captions = [caption_for(*combos[(7 * i) % len(combos)]) for i in range(120)]
    return [Case({"captions": captions, "seed": 0, "p": CAPTION_DROPOUT}),
            Case({"captions": captions[:40], "seed": 1, "p": 0.5}),
            Case({"captions": captions[:60], "seed": 2, "p": 0.25}),
            Case({"captions": captions[:9], "seed": 3, "p": CAPTION_DROPOUT})]


def check_drop_captions(fn) -> bool:
    """Exercise 10.2: fn(captions, generator, p) -> the captions, each replaced by "" with probability p."""
    name = "check_drop_captions"
    require_callable(name, fn)
    hint = ("one uniform number per caption, drop = torch.rand(len(captions), generator=generator) < p; "
            "return a new list with \"\" where drop is True and the caption where it is False")
    mistakes = [
        Mistake(_ONE_MINUS_P, lambda ref, c: _wrong_drop(*c, how="keep_p")),
        Mistake(_ONE_MINUS_P, lambda ref, c: _wrong_drop(*c, how="greater")),
        Mistake("the whole batch is dropped or kept at once: draw one number per caption, torch.rand(len(captions), "
                "generator=generator), so each batch mixes captioned and empty samples",
                lambda ref, c: _wrong_drop(*c, how="whole_batch")),
        Mistake("p is ignored (always 0.1): use the probability you are given",
                lambda ref, c: _wrong_drop(*c, how="fixed_p")),
    ]
    ref_name = "sd.training.unet.drop_captions"
    cases = _caption_cases()
    with torch.random.fork_rng(devices=[]):
        for i, case in enumerate(cases):
            captions, seed, p = case.inputs["captions"], case.inputs["seed"], case.inputs["p"]
            where = f"{name} failed on batch {i + 1} of {len(cases)} ({len(captions)} captions, p = {p})"
            expected = reference_drop_captions(list(captions), torch.Generator().manual_seed(seed), p)
            given = list(captions)
            try:
                got = fn(given, torch.Generator().manual_seed(seed), p)
                again = fn(list(captions), torch.Generator().manual_seed(seed), p)
            except NotImplementedError:
                raise
            except Exception as e:
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}" + _hint_line(hint)) from e
            problem = _caption_problem(got, again, given, captions, expected, p)
            if problem is None:
                continue
            if problem == "differs":
                named = next((m.hint for m in mistakes if m.compute(None, (captions, seed, p)) == list(got)), None)
                dropped = sum(c == "" for c in got)
                first = next(j for j, (g, e) in enumerate(zip(got, expected)) if g != e)
                problem = (f"yours drops {dropped} of {len(captions)} captions, {ref_name}'s draw drops "
                           f"{sum(c == '' for c in expected)}; the first difference is caption {first}: yours "
                           f"{got[first]!r}, expected {expected[first]!r}" + _hint_line(named or hint))
            raise AssertionError(f"{where}:\n  {problem}")
    print(f"✅ {name} passed: drops the same captions as {ref_name} on {len(cases)} random batches")
    return True


def _caption_problem(got: Any, again: Any, given: list, captions: list, expected: list, p: float) -> str | None:
    """What is wrong with the learner's output (a sentence with its hint), "differs" for a different draw, or None."""
    if given != list(captions):
        return ("your function changed the list it was given: return a new list (the dataset's captions must stay "
                "as they are for the next epoch)")
    if not isinstance(got, list) or len(got) != len(captions):   # the exercise asks for a new list
        what = f"a {type(got).__name__} of {len(got)} items" if isinstance(got, (list, tuple)) else repr(got)[:80]
        return f"the output should be a list of {len(captions)} captions, as the exercise states, got {what}"
    if any(g is None for g in got):
        return ("a dropped caption is None: replace it by the empty string \"\" (CLIP encodes \"\" into the "
                "unconditional context that guidance needs; None cannot be tokenized)")
    if any(isinstance(g, str) and g != "" and not g.strip() for g in got):
        return ("a dropped caption is a space \" \" (or other whitespace): replace it by the empty string \"\", "
                "the exact prompt sampling uses for the unconditional half of classifier-free guidance")
    bad = next(((j, g) for j, g in enumerate(got) if not isinstance(g, str) or g not in ("", captions[j])), None)
    if bad is not None:
        j, g = bad
        return (f"caption {j} became {g!r}: each caption stays as it is ({captions[j]!r}) or becomes \"\""
                + _hint_line("return [\"\" if d else c for c, d in zip(captions, drop.tolist())]"))
    if list(got) != list(again):
        return ("two calls with generators seeded alike dropped different captions" + _hint_line(
            "draw from the generator you are given, torch.rand(len(captions), generator=generator), not from "
            "Python's random module or torch's global generator"))
    return None if list(got) == expected else "differs"
