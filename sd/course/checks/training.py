"""Checks for notebook 10 (training): the UNet's training loss (10.1), and one training step with caption
dropout (10.2).

Both exercises draw random numbers, so both take a `torch.Generator`: the check runs the learner's function and
the reference with generators seeded alike and compares the results exactly. The model is a small stand-in for the
UNet, with the UNet's call. For the loss the check also compares the gradients it sends into the stand-in's
weights, and looks at behaviour: every trainable weight gets a gradient, the frozen models' outputs (latents, text
states) get none, the loss draws from the generator it is given and not from torch's global one, it changes none of
its inputs in place and leaves the backward pass to the training loop. The loss takes optional per-timestep
weights (min-SNR weighting, Hang et al. 2023), checked on batches with weights too. For the step, the check hands
in a text encoder and a loss that record what they receive, so a wrong posterior sample or a wrong caption dropout
is named, and it compares the weights after two steps (an optimizer that is never stepped, gradients that are
never zeroed). The `Mistake`s recompute the typical wrong ways (x_0 or x_t as the target, t drawn from [1, T], no
latent scale, a wrong alpha_bar, the weights ignored, dropout with probability 1 - p, ...), so a wrong answer is
named, not just reported. Every message is in words: the answer's code is only printed by `solution()`.
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
from .common import (ATOL, RTOL, Case, Mistake, _crash_line, _more_help, _unknown_mistake, randn, require_callable,
                     seeded)

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


_WEIGHT_HINT = ("the loss takes an optional last argument, weight (None by default): a (T,) tensor of "
                "per-timestep weights (min-SNR weighting); without it, the plain mean squared error")


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
                            + _hint_line("hand back the loss tensor itself, not its value as a Python number: the "
                                         "training loop calls backward on it"))
        if loss.numel() != 1:
            raise _NotALoss(f"the loss should be one number (a 0-d tensor), got shape {tuple(loss.shape)}"
                            + _hint_line("average the squared error over the batch and every latent element"))
        if not loss.requires_grad:
            raise _NotALoss("the loss carries no gradient back to the UNet's weights"
                            + _hint_line("compute the prediction with gradients on (not under no-grad, not "
                                         "detached): the UNet learns through the backward pass"))
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
    training loss; with weight (T,), each sample's mean squared error times the weight of its timestep, averaged
    over the batch."""
    name = "check_unet_training_loss"
    require_callable(name, fn)

    def wrong(**how):
        return lambda ref, c: _loss_and_grads(lambda *a, **k: _wrong_loss(*a, **k, **how), c)[0]

    mistakes = [
        Mistake("the target is the clean latent z0: SD's UNet predicts the NOISE ε (ε-prediction, Ho et al. "
                "2020, eq. 14), so the loss compares its prediction with the noise", wrong(target="x0")),
        Mistake("the target is the noisy latent z_t: the UNet must predict the noise ε that was added",
                wrong(target="z_t")),
        Mistake("t is drawn from [1, T]: the training timesteps are 0, ..., T − 1 (the schedule's first entry is "
                "the first noising step)", wrong(t_range="one_to_T")),
        Mistake("t is drawn from [1, T − 1]: t = 0 is a training timestep too, draw from 0 to T − 1",
                wrong(t_range="one_to_T_minus_1")),
        Mistake("the latents are not multiplied by latent_scale: the UNet works on the scaled latents (SD v1: "
                "0.18215), of about unit variance like the noise", wrong(scale="none")),
        Mistake("the latents are divided by latent_scale: multiply (decoding divides)", wrong(scale="divide")),
        Mistake("the noise is drawn before t: draw t first, then the noise, so that the same generator gives "
                "the same numbers as the reference", wrong(noise_first=True)),
        Mistake("one t for the whole batch: draw one timestep per sample (B of them), so each batch trains many "
                "noise levels", wrong(one_t=True)),
        Mistake("the square roots are missing: z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε", wrong(coef="no_sqrt")),
        Mistake("the noise is scaled by 1 − ᾱ_t, a variance: scale it by √(1 − ᾱ_t)", wrong(coef="variance")),
        Mistake("the coefficients are swapped: z0 gets √ᾱ_t, the noise √(1 − ᾱ_t)", wrong(coef="swapped")),
        Mistake("ᾱ is taken at t − 1: use the schedule's entry at t itself", wrong(shift=-1)),
        Mistake("ᾱ_t (shape (B,)) is not reshaped to (B, 1, 1, 1), so it broadcasts along the width: give it "
                "three trailing axes of size 1", wrong(reshape=False)),
        Mistake("the loss is summed: take the mean over the batch and every latent element",
                wrong(reduction="sum")),
        Mistake("the weights are ignored: with weight given, multiply each sample's mean squared error by the "
                "weight of its own timestep, weight[t], then average over the batch", wrong(weighting="ignored")),
        Mistake("the weights multiply the batch's mean error (the mean of the B weights times the mean error): "
                "weigh each sample's own error, its mean over (C, h, w), one number per sample, then average",
                wrong(weighting="after_mean")),
        Mistake("the (B,) weights multiply the squared error (B, C, h, w) without a reshape, so they broadcast "
                "along the width: average each sample's error to one number first, or give the weights three "
                "trailing axes of size 1", wrong(weighting="not_reshaped")),
    ]
    hint = ("draw one t per sample uniformly from 0 to T − 1, then noise of the latents' shape, both from the "
            "generator; scale the latents; z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε; the mean squared error between the "
            "UNet's prediction for (z_t, context, t) and ε")
    ref_name = "the reference loss (the one that trained the shipped model)"
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
                    "t must index the schedule: draw it from 0 to T − 1 with T its length; don't assume "
                    "T = 1000") + _more_help("10.1")) from e
            except Exception as e:
                no_weight = isinstance(e, TypeError) and "weight" in str(e)     # a loss without the weight argument
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                     + _hint_line(_WEIGHT_HINT if no_weight else hint) + _more_help("10.1")) from e
            if not _same_number(got, again):
                raise AssertionError(f"{where}:\n  two calls with generators seeded alike gave two losses "
                                     f"({float(got):.6g} and {float(again):.6g})" + _hint_line(
                                         "draw every random number (t and the noise) from the generator you are "
                                         "given; then training runs are reproducible"))
            if not _same_number(got, expected):
                named = next((m.hint for m in mistakes if _matches(m, case, got)), None)
                raise AssertionError(f"{where}:\n  the loss is {float(got):.6g}, {ref_name} gives "
                                     f"{float(expected):.6g}" + (_hint_line(named) if named else
                                                                  _hint_line(hint) + _unknown_mistake("10.1")))
            scale = float(expected_grads.abs().max())
            if not torch.allclose(grads, expected_grads, rtol=_GRAD_RTOL, atol=_GRAD_ATOL_FRACTION * scale):
                diff = float((grads - expected_grads).abs().max())
                raise AssertionError(f"{where}:\n  the loss is right but the gradients in the UNet's weights differ "
                                     f"(max difference {diff:.3g}, largest gradient {scale:.3g})" + _hint_line(
                                         "compute the loss from the UNet's prediction as it is: nothing detached, "
                                         "nothing under no-grad, nothing done to it after the squared error"))
            worst = max(worst, float((got - expected).abs()))
        problem = _loss_behaviour_problem(fn, cases[0])
        if problem:
            raise AssertionError(f"{name} failed on random input 1 ({_describe(cases[0])}):\n  {problem}")
    print(f"✅ {name} passed: the same loss and gradients as {ref_name} on {len(cases)} random batches "
          f"(max diff {worst:.1g}); gradients reach every UNet weight and nothing else; no input changed")
    return True


def _loss_behaviour_problem(fn: Callable, case: Case) -> str | None:
    """What the loss does besides its value that a training loop would suffer from, in words; None when nothing.

    The latents and text states come in as the frozen VAE's and text encoder's outputs do: tensors that need no
    gradient. After the call the check runs the backward pass itself, as the training loop does.
    """
    unet = _build_predictor()
    inputs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.inputs.items()}
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    generator = torch.Generator().manual_seed(inputs.pop("seed"))
    weight = inputs.pop("weight", None)
    generator_before, global_before = generator.get_state(), torch.get_rng_state()
    with torch.enable_grad():
        loss = fn(unet, *inputs.values(), generator) if weight is None else \
            fn(unet, *inputs.values(), generator, weight=weight)
        if any(p.grad is not None for p in unet.parameters()):
            return ("the UNet's weights already hold gradients when your loss returns: it ran the backward pass "
                    "itself; hand back the loss and leave the backward pass to the training loop (which zeroes the "
                    "gradients first)")
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and not torch.equal(v, before[k]):
                return (f"your loss changed its input {k} in place: compute new tensors (the scaled latents, "
                        f"z_t) instead, or the dataset's tensors change at every step")
        if not torch.equal(torch.get_rng_state(), global_before):
            return ("your loss drew random numbers from torch's global generator: draw every one (t and the noise) "
                    "from the generator you are given")
        if torch.equal(generator.get_state(), generator_before):
            return "your loss never drew from the generator it was given: draw t and the noise from it"
        loss.backward()
    for k in ("latents", "context"):
        if inputs[k].requires_grad or inputs[k].grad is not None:
            return (f"the {k} (an output of the frozen VAE or text encoder) now require gradients: they are fixed "
                    f"inputs of the UNet's training, leave them as they are")
    silent = [n for n, p in unet.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    if silent:
        return (f"the UNet's weights {', '.join(silent)} get no gradient from your loss: the prediction must come "
                f"from one forward pass of the UNet on z_t, with gradients on")
    return None


def _matches(mistake: Mistake, case: Case, got: torch.Tensor) -> bool:
    try:
        return _same_number(got, mistake.compute(None, case))
    except Exception:
        return False       # this mistake cannot happen with this input (e.g. t = T drawn)


# ----------------------------------------------------------------------------------------------------------
# Exercise 10.2: one training step, with caption dropout for classifier-free guidance
# ----------------------------------------------------------------------------------------------------------

_STEP_LR = 0.5                      # plain SGD in the check: a step moves each weight by lr x its gradient, visibly
_STEP_SCALE = 0.5                   # the latent scale of the check's loss
_STEP_CONTEXT_LEN = 6               # tokens per caption in the check's text states


def reference_drop_captions(captions: Sequence[str], generator: torch.Generator,
                            p: float = CAPTION_DROPOUT) -> list[str]:
    """The captions with each replaced by "" with probability p: the same draw as sd.training.unet.drop_captions."""
    # sd's drop_captions works on text states (B, T, C): give it ones for "kept", zeros for "the empty caption"
    kept = drop_captions(torch.ones(len(captions), 1, 1), torch.zeros(1, 1, 1), generator, p)   # (B, 1, 1)
    return [caption if keep else "" for caption, keep in zip(captions, kept.flatten().bool().tolist())]


def reference_training_step(unet: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                            means: torch.Tensor, logvars: torch.Tensor, captions: Sequence[str], encode: Callable,
                            generator: torch.Generator, p: float = CAPTION_DROPOUT) -> float:
    """The reference for exercise 10.2: one step of the UNet's training, as sd.training.unet runs it; the loss value."""
    # 1. a sample of each image's posterior q(z | x), unscaled: (B, 4, h, w); its noise is the first draw
    noise = torch.randn(means.shape, generator=generator)
    latents = means + torch.exp(0.5 * logvars) * noise
    # 2. caption dropout (Ho & Salimans 2022, sec. 3.2), then the frozen text encoder: (B, 77, D)
    context = encode(reference_drop_captions(captions, generator, p))
    # 3. the loss (it draws t and the noise), then one optimizer step on fresh gradients
    loss = loss_fn(unet, latents, context, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


class _TextEncoderSpy:
    """The frozen text encoder the check hands in: a list of captions -> (B, S, D) states; it records every call."""

    def __init__(self, table: dict[str, torch.Tensor], unknown: torch.Tensor):
        self.table, self.unknown, self.calls = table, unknown, []

    def __call__(self, captions):
        self.calls.append(list(captions) if isinstance(captions, (list, tuple)) else captions)
        if not isinstance(captions, (list, tuple)):
            raise TypeError(f"the text encoder takes a list of captions, got {type(captions).__name__}")
        return torch.cat([self.table.get(c, self.unknown) if isinstance(c, str) else self.unknown
                          for c in captions])


class _LossSpy:
    """The loss the check hands in (the reference loss, no weights); it records the latents and states it gets."""

    def __init__(self):
        self.latents, self.contexts = [], []
        self.alphas_cumprod = DiffusionScheduler().alphas_cumprod

    def __call__(self, unet, latents, context, generator):
        self.latents.append(latents.detach().clone())
        self.contexts.append(context.detach().clone())
        return reference_unet_training_loss(unet, latents, context, self.alphas_cumprod, _STEP_SCALE, generator)


def _step_cases() -> list[Case]:
    combos = training_combinations()
    with seeded(81):
        cases = []
        for k, (b, p) in enumerate(((12, CAPTION_DROPOUT), (8, 0.5), (10, 0.25))):
            captions = [caption_for(*combos[(5 * i + 3 * k) % len(combos)]) for i in range(b)]
            cases.append(Case({"means": _LATENT_STD * randn(b, 4, 4, 4), "logvars": -2 + randn(b, 4, 4, 4),
                               "captions": captions, "seed": 10 + k, "p": p}))
        return cases


def _states_table(captions: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with seeded(82):
        table = {c: randn(1, _STEP_CONTEXT_LEN, _CONTEXT_DIM) for c in sorted(set(captions)) + [""]}
        return table, randn(1, _STEP_CONTEXT_LEN, _CONTEXT_DIM)


def _run_steps(fn: Callable, case: Case, steps: int = 2) -> dict:
    """Run fn for `steps` steps on the case's batch (one generator running on); record what it did."""
    i = case.inputs
    means, logvars, captions = i["means"].clone(), i["logvars"].clone(), list(i["captions"])
    table, unknown = _states_table(captions)
    encode, loss_fn = _TextEncoderSpy(table, unknown), _LossSpy()
    unet = _build_predictor()
    optimizer = torch.optim.SGD(unet.parameters(), lr=_STEP_LR)
    generator = torch.Generator().manual_seed(i["seed"])
    record = {"start": _flat_weights(unet), "weights": [], "losses": [], "encode": encode, "loss_fn": loss_fn,
              "changed": None, "global_rng": False, "table": table}
    global_before = torch.get_rng_state()
    with torch.enable_grad():
        for _ in range(steps):
            record["losses"].append(fn(unet, optimizer, loss_fn, means, logvars, captions, encode, generator,
                                       i["p"]))
            record["weights"].append(_flat_weights(unet))
    record["global_rng"] = not torch.equal(torch.get_rng_state(), global_before)
    if captions != list(i["captions"]):
        record["changed"] = "captions"
    elif not (torch.equal(means, i["means"]) and torch.equal(logvars, i["logvars"])):
        record["changed"] = "means or log-variances"
    return record


def _flat_weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _wrong_latents(case: Case, how: str) -> torch.Tensor:
    """The first step's latents drawn a typical wrong way."""
    i = case.inputs
    generator = torch.Generator().manual_seed(i["seed"])
    if how == "dropout_first":
        torch.rand(len(i["captions"]), generator=generator)
    noise = torch.randn(i["means"].shape, generator=generator)
    std = {"exp_logvar": torch.exp(i["logvars"]), "logvar": i["logvars"]}.get(how, torch.exp(0.5 * i["logvars"]))
    if how == "mean_only":
        return i["means"]
    latents = i["means"] + std * noise
    return latents * _STEP_SCALE if how == "scaled" else latents


_LATENT_MISTAKES = [
    ("mean_only", "the latents are the posterior means: SD trains on a SAMPLE of q(z | x), mean + σ ε with "
                  "σ = exp(logvar / 2) and ε drawn from the generator"),
    ("exp_logvar", "the noise is scaled by exp(logvar), the variance: the standard deviation is exp(logvar / 2)"),
    ("logvar", "the noise is scaled by the log-variance itself: the standard deviation is exp(logvar / 2)"),
    ("dropout_first", "the dropout's numbers are drawn before the posterior's noise: draw the posterior's noise "
                      "first, then one number per caption, then let the loss draw its own"),
    ("scaled", "the latents are multiplied by the latent scale before the loss, which scales them itself: hand "
               "it the unscaled sample"),
]


def _wrong_dropped(case: Case, how: str) -> list[str]:
    """The first step's captions after a typical wrong dropout (the posterior's noise drawn first, as it should)."""
    i = case.inputs
    generator = torch.Generator().manual_seed(i["seed"])
    torch.randn(i["means"].shape, generator=generator)
    captions, p = i["captions"], i["p"]
    if how == "whole_batch":
        drop = [bool(torch.rand(1, generator=generator) < p)] * len(captions)
    else:
        u = torch.rand(len(captions), generator=generator)
        drop = {"keep_p": u < 1 - p, "greater": u > p, "fixed_p": u < CAPTION_DROPOUT}[how].tolist()
    return ["" if d else c for c, d in zip(captions, drop)]


_ONE_MINUS_P = ("this drops with probability 1 − p (90% of the captions when p = 0.1): drop a caption where its "
                "uniform number is below p, keep the others")
_DROPOUT_MISTAKES = [
    ("keep_p", _ONE_MINUS_P), ("greater", _ONE_MINUS_P),
    ("whole_batch", "the whole batch is dropped or kept at once: draw one number per caption, so each batch "
                    "mixes captioned and empty samples"),
    ("fixed_p", "p is ignored (always 0.1): use the probability you are given"),
]


def _dropout_problem(got: Any, captions: list, expected: list, case: Case) -> str | None:
    """What is wrong with the captions the learner encoded, in words; None when they are the expected ones."""
    if not isinstance(got, list) or len(got) != len(captions):
        what = f"a {type(got).__name__} of {len(got)} items" if isinstance(got, (list, tuple)) else repr(got)[:80]
        return (f"the text encoder should get the batch's {len(captions)} captions (after the dropout) as a list, "
                f"got {what}")
    if any(g is None for g in got):
        return ("a dropped caption is None: replace it by the empty string \"\" (CLIP encodes \"\" into the "
                "unconditional context that guidance needs; None cannot be tokenized)")
    if any(isinstance(g, str) and g != "" and not g.strip() for g in got):
        return ("a dropped caption is a space (or other whitespace): replace it by the empty string \"\", the "
                "exact prompt sampling uses for the unconditional half of classifier-free guidance")
    bad = next(((j, g) for j, g in enumerate(got) if not isinstance(g, str) or g not in ("", captions[j])), None)
    if bad is not None:
        j, g = bad
        return f"caption {j} became {g!r}: each caption stays as it is ({captions[j]!r}) or becomes \"\""
    if got == expected:
        return None
    if not any(c == "" for c in got):
        named = ("no caption was dropped: draw one uniform number per caption from the generator (after the "
                 "posterior's noise) and replace the caption by \"\" where it is below p (one number for the whole "
                 "batch would keep or drop all of them at once)")
    else:
        named = next((hint for how, hint in _DROPOUT_MISTAKES if _wrong_dropped(case, how) == got), None)
    first = next(j for j, (g, e) in enumerate(zip(got, expected)) if g != e)
    return (f"your step dropped {sum(c == '' for c in got)} of {len(captions)} captions, the reference's draw "
            f"{sum(c == '' for c in expected)}; the first difference is caption {first}: yours {got[first]!r}, "
            f"expected {expected[first]!r}" + (_hint_line(named) if named else _unknown_mistake("10.2")))


def check_training_step(fn) -> bool:
    """Exercise 10.2: fn(unet, optimizer, loss_fn, means, logvars, captions, encode, generator, p) -> the loss as a
    number, after one optimizer step: a posterior sample, caption dropout, the frozen text encoder, the loss."""
    name = "check_training_step"
    require_callable(name, fn)
    hint = ("in this order: a posterior sample (its noise drawn first), one uniform number per caption for the "
            "dropout, the text states of the captions after it, the loss (which draws its own numbers); then zero "
            "the gradients, run the backward pass, take the optimizer's step and give back the loss's value")
    cases = _step_cases()
    with torch.random.fork_rng(devices=[]):
        for k, case in enumerate(cases):
            i = case.inputs
            where = (f"{name} failed on batch {k + 1} of {len(cases)} ({len(i['captions'])} captions, "
                     f"latents {tuple(i['means'].shape)}, p = {i['p']}, generator seeded {i['seed']})")
            expected = _run_steps(reference_training_step, case)
            try:
                got = _run_steps(fn, case)
            except NotImplementedError:
                raise
            except Exception as e:
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                     + _hint_line(hint) + _more_help("10.2")) from e
            problem = _step_problem(got, expected, case)
            if problem:
                raise AssertionError(f"{where}:\n  {problem}")
    print(f"✅ {name} passed: the same posterior samples, dropped captions, losses and weights after two steps as "
          f"the reference step on {len(cases)} batches")
    return True


def _step_problem(got: dict, expected: dict, case: Case) -> str | None:
    """The first thing in which the learner's steps differ from the reference's, in words; None when nothing."""
    captions = list(case.inputs["captions"])
    if got["changed"]:
        return (f"your step changed the {got['changed']} it was given: work on new tensors and a new list (the "
                f"dataset's captions and posteriors must stay as they are for the next epoch)")
    if got["global_rng"]:
        return ("your step drew random numbers from torch's global generator (or Python's): draw every one from "
                "the generator you are given, so that training runs are reproducible")
    calls, spy = got["encode"].calls, got["loss_fn"]
    if len(spy.latents) != 2:
        return (f"the loss you are given was computed {len(spy.latents)} times in two steps: once per step, on the "
                f"batch's posterior sample and text states")
    for step in range(2):
        ordinal = ("first", "second")[step]
        if not torch.allclose(spy.latents[step], expected["loss_fn"].latents[step], atol=ATOL, rtol=RTOL):
            if step == 0:
                named = next((h for how, h in _LATENT_MISTAKES if torch.allclose(
                    spy.latents[0], _wrong_latents(case, how), atol=ATOL, rtol=RTOL)), None)
            else:
                named = None
            return (f"the latents handed to the loss in the {ordinal} step differ from the reference's posterior "
                    f"sample (max difference {float((spy.latents[step] - expected['loss_fn'].latents[step]).abs().max()):.3g})"
                    + (_hint_line(named) if named else _hint_line(
                        "the posterior sample is mean + exp(logvar / 2) ε, with ε the generator's first draw of "
                        "the step") + _unknown_mistake("10.2")))
        if not torch.allclose(spy.contexts[step], expected["loss_fn"].contexts[step], atol=ATOL, rtol=RTOL):
            expected_captions = expected["encode"].calls[step]
            one_call = [c for c in calls if isinstance(c, list) and len(c) == len(captions)]
            if not calls:
                return ("the text encoder you are given was never called: encode the batch's captions (after the "
                        "dropout) with it")
            zero_rows = (spy.contexts[step].flatten(1).abs().sum(dim=1) == 0)
            if bool(zero_rows.any()):
                return ("some samples' text states are zeros: a dropped caption's states are those of the empty "
                        "caption \"\" as the text encoder encodes it, the context sampling uses for the "
                        "unconditional half of guidance")
            if len(one_call) > step:
                found = _dropout_problem(one_call[step], captions, expected_captions, case)
                if found:
                    return found
            return ("the text states handed to the loss are not those of the captions after the dropout"
                    + _hint_line(hint) + _unknown_mistake("10.2"))
        loss = got["losses"][step]
        if isinstance(loss, torch.Tensor):
            return ("your step gives back a tensor: give back the loss's value as a Python number (a tensor kept in the "
                    "list of losses would keep each step's graph alive)")
        if not isinstance(loss, (float, int)) or abs(loss - expected["losses"][step]) > ATOL + RTOL * abs(loss):
            return (f"your step gives back {loss!r} in the {ordinal} step, the reference {expected['losses'][step]:.6g}: "
                    f"give back the loss's value, computed before the optimizer's step")
        before = got["start"] if step == 0 else got["weights"][0]
        if torch.equal(got["weights"][step], before):
            return (f"the weights did not move in the {ordinal} step: after the backward pass, the optimizer takes "
                    f"its step (and the gradients are zeroed BEFORE the backward pass, not between it and the step)")
        if not torch.allclose(got["weights"][step], expected["weights"][step], atol=ATOL, rtol=RTOL):
            if step == 1:
                return ("the first step is right but the second is not: the gradients of the first step are still "
                        "there when the second adds its own; zero them before each backward pass")
            return ("the weights after the step differ from the reference's: one backward pass of the loss, then "
                    "one optimizer step" + _unknown_mistake("10.2"))
    return None
