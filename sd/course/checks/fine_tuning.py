"""Checks for the fine-tuning notebook (12): one step of textual inversion, the LoRA layer (its forward, merging
and unmerging), and wrapping a model's attention projections with LoRA.

The LoRA reference is `sd.adapters.lora.LoRALayer` itself (tests/test_checks_fine_tuning.py proves it equals
PEFT's); the wrapping reference is written here after `sd.adapters.lora.add_lora` (the tests prove they wrap the
same layers); the textual-inversion reference step is written out here, after Gal et al. 2022, sec. 4 (SD's
noise-prediction loss, the gradient kept only on the new word's rows), and the tests prove that it is
`sd.adapters.textual_inversion.textual_inversion_step`.

What is trained is checked by its behaviour as well as its values: the LoRA layer must leave its frozen weight
alone in forward, give the same output twice, let the gradient reach x, A and B (and not W), and merge and unmerge
exactly; the textual-inversion step must move the new word's rows and nothing else, with the word NOT in the
table's last row; the wrapping must wrap exactly the attention projections, freeze the rest and return A and B.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters.lora import UNET_TARGETS, LoRALayer
from ...adapters.prior_preservation import prior_preservation_loss
from ...adapters.textual_inversion import add_token_rows, textual_inversion_optimizer
from ...clip import CLIP
from ...config import CLIPConfig, UNetConfig, VAEConfig
from ...decoder import VAE_Decoder
from ...diffusion import DiffusionScheduler
from ...encoder import VAE_Encoder
from ...io.checkpoint import DEFAULT_MODEL
from ...pipeline import StableDiffusion
from ...tokenizer import CLIPTokenizer
from ...unet import DiffusionUNET
from .common import (ATOL, RTOL, SEED, Case, Mistake, _crash_line, _kind, _more_help, _unknown_mistake,
                     build_learner_module, check_function, check_module, copy_weights, randn,
                     randomise_constant_parameters, require_callable, seeded)

# ----------------------------------------------------------------------------------------------------------
# Exercise 12.2: the LoRA layer: forward, merge, unmerge
# ----------------------------------------------------------------------------------------------------------

# (in, out, rank, alpha, scale): the right factor scale * alpha / r and the wrong ones (scale, scale * r / alpha,
# scale^2 * alpha / r, alpha / r) all differ, so each mistake has an output of its own; the first layer is square,
# so that A and B swapped (or the update transposed) still runs there.
_LORA_SHAPES = ((16, 16, 4, 12.0, 0.5), (24, 12, 2, 1.0, 1.5), (12, 20, 8, 16.0, 0.75))
# Merging adds a float32 update to W and unmerging subtracts it again: both round, by ~1e-7 of W's size.
_MERGE_ATOL = 1e-5


def _lora_cases() -> list[Case]:
    cases = []
    with seeded(100):
        for j, (d_in, d_out, rank, alpha, scale) in enumerate(_LORA_SHAPES):
            base = nn.Linear(d_in, d_out).requires_grad_(False)          # frozen, as add_lora leaves it
            cases.append(Case({"x": randn(2, 5, d_in) if j != 1 else randn(3, d_in)},
                              init={"base": base, "rank": rank, "alpha": alpha, "scale": scale}))
    return cases


def _lora_pair(cls, case: Case, index: int) -> tuple[nn.Module, LoRALayer]:
    """The learner's layer and the reference, each around its own copy of the case's frozen base, with the same
    (random, non-zero) weights."""
    init = dict(case.init, base=copy.deepcopy(case.init["base"]))
    with seeded(SEED + index):
        reference = LoRALayer(**init)
        randomise_constant_parameters(reference)                      # B = 0 would hide every mistake
    learner = build_learner_module(cls, dict(case.init, base=copy.deepcopy(case.init["base"])))
    copy_weights(learner, reference, cls.__name__)
    return learner, reference


def _grads(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The gradients of sum(weight * layer(x)) with respect to x, A, B and the frozen W."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (layer(x) * weight).sum().backward()
    return {"x": x.grad, "A": layer.lora_A.weight.grad, "B": layer.lora_B.weight.grad,
            "W": layer.base.weight.grad}


def _lora_behaviour(cls, check_name: str) -> None:
    """Side effects and gradients of forward, then merge and unmerge: AssertionError naming what is wrong."""
    for i, case in enumerate(_lora_cases()):
        where = f"{check_name} failed on layer {i + 1} of {len(_LORA_SHAPES)} ({case.describe()}, rank " \
                f"{case.init['rank']}, alpha {case.init['alpha']:g}, scale {case.init['scale']:g})"
        x = case.inputs["x"]
        # 1. forward leaves W alone and gives the same output twice
        learner, reference = _lora_pair(cls, case, i)
        w0 = learner.base.weight.detach().clone()
        with torch.no_grad():
            first = learner(x.clone())
            if not torch.equal(learner.base.weight, w0):
                raise AssertionError(f"{where}:\n  forward changed the frozen weight W (by up to "
                                     f"{float((learner.base.weight - w0).abs().max()):.3g}): it must only read it; "
                                     f"folding the update into W is what merging does, once, not every call")
            second = learner(x.clone())
        if not torch.allclose(first, second, atol=ATOL, rtol=RTOL):
            raise AssertionError(f"{where}:\n  a second call on the same input gave another output (max difference "
                                 f"{float((first - second).abs().max()):.3g}): forward must have no side effects")
        # 2. gradients reach x, A and B, and not the frozen W
        learner, reference = _lora_pair(cls, case, i)
        with seeded(SEED + 10 + i):
            weight = randn(*reference(x).shape)
        got, want = _grads(learner, x, weight), _grads(reference, x, weight)
        for name in ("A", "B"):
            if got[name] is None:
                raise AssertionError(f"{where}:\n  no gradient reaches {name}: the low-rank update must be computed "
                                     "from lora_A and lora_B in the graph, so that they can train")
            if not torch.allclose(got[name], want[name], atol=ATOL, rtol=RTOL):
                raise AssertionError(f"{where}:\n  the gradient of {name} differs from the reference's by up to "
                                     f"{float((got[name] - want[name]).abs().max()):.3g}" + _unknown_mistake("12.2"))
        if got["x"] is None:
            raise AssertionError(f"{where}:\n  no gradient reaches the input x: the layers before this one could "
                                 "not learn through it; keep the whole output in the autograd graph")
        if not torch.allclose(got["x"], want["x"], atol=ATOL, rtol=RTOL):
            update_only = want["x"] - weight.reshape(-1, weight.shape[-1]).matmul(
                reference.base.weight.detach()).reshape(want["x"].shape)
            if torch.allclose(got["x"], update_only, atol=ATOL, rtol=RTOL):
                raise AssertionError(f"{where}:\n  the gradient reaching x lacks the frozen layer's part: its output "
                                     "is detached (or computed without gradients). W is frozen, but the gradient must "
                                     "still flow back through W x to the input, and on to the layers before")
            raise AssertionError(f"{where}:\n  the gradient reaching x differs from the reference's by up to "
                                 f"{float((got['x'] - want['x']).abs().max()):.3g}" + _unknown_mistake("12.2"))
        if got["W"] is not None:
            raise AssertionError(f"{where}:\n  the frozen weight W received a gradient: leave it frozen, only A "
                                 "and B train")
        # 3. merge folds scale * alpha / r * B A into W (forward unchanged); unmerge takes it out again
        learner, reference = _lora_pair(cls, case, i)
        for method in ("merge", "unmerge"):
            if not callable(getattr(learner, method, None)):
                raise AssertionError(f"{where}:\n  your layer has no method {method}: write it in the exercise cell")
        with torch.no_grad():
            delta = reference.delta_weight()                              # (out, in)
            w0, before = learner.base.weight.clone(), learner(x.clone())
            learner.merge()
            merged = learner.base.weight.clone()
            if not torch.allclose(merged, w0 + delta, atol=_MERGE_ATOL):
                known = {"left W as it was": w0, "replaced W by the update instead of adding it": delta,
                         "added the update without its factor scale times alpha over rank":
                             w0 + delta / (reference.scale * reference.alpha / reference.rank),
                         "added the update transposed (A B instead of B A, or B A transposed)": w0 + delta.T
                         if delta.shape[0] == delta.shape[1] else None,
                         "subtracted the update": w0 - delta}
                what = next((k for k, v in known.items() if v is not None and torch.allclose(merged, v, atol=_MERGE_ATOL)),
                            None)
                raise AssertionError(f"{where}:\n  merge {what or 'gave W a wrong value'}: after merging, W must be "
                                     "W plus scale times alpha over rank times B A (out by in), the update the "
                                     "forward adds" + ("" if what else _unknown_mistake("12.2")))
            after = learner(x.clone())
            if not torch.allclose(after, before, atol=_MERGE_ATOL, rtol=RTOL):
                twice = torch.allclose(after - before, before - reference.base(x), atol=_MERGE_ATOL, rtol=RTOL)
                raise AssertionError(f"{where}:\n  after merging, forward gives another output (max difference "
                                     f"{float((after - before).abs().max()):.3g})"
                                     + (": it adds the update a second time; once merged, W already holds it, so "
                                        "forward must skip the low-rank branch (the merged flag)" if twice else
                                        _unknown_mistake("12.2")))
            learner.unmerge()
            if not torch.allclose(learner.base.weight, w0, atol=_MERGE_ATOL):
                raise AssertionError(f"{where}:\n  unmerge did not give W back (max difference "
                                     f"{float((learner.base.weight - w0).abs().max()):.3g}): subtract the update "
                                     "that merge added")
            again = learner(x.clone())
            if not torch.allclose(again, before, atol=_MERGE_ATOL, rtol=RTOL):
                raise AssertionError(f"{where}:\n  after unmerging, forward gives another output (max difference "
                                     f"{float((again - before).abs().max()):.3g}): the low-rank branch must be "
                                     "back in forward once the update has left W")


def check_lora_layer(cls) -> bool:
    """Exercise 12.2: cls(base, rank, alpha, scale) with base, lora_A, lora_B; forward = W x + scale (alpha / r)
    B A x, with no side effect and gradients to x, A and B; merge and unmerge fold the update in and out of W."""
    def wrong(kind):
        def compute(ref, c):
            x = c.inputs["x"]
            a, b, w = ref.lora_A.weight, ref.lora_B.weight, ref.scale
            update = ref.lora_B(ref.lora_A(x))
            return {"no_ratio": ref.base(x) + w * update,
                    "inverted": ref.base(x) + w * (ref.rank / ref.alpha) * update,
                    "swapped": ref.base(x) + w * (ref.alpha / ref.rank) * (x @ b @ a),
                    "no_base": w * (ref.alpha / ref.rank) * update,
                    "scale_twice": ref.base(x) + w * w * (ref.alpha / ref.rank) * update,
                    "no_scale": ref.base(x) + (ref.alpha / ref.rank) * update,
                    "base_only": ref.base(x)}[kind]
        return compute

    mistakes = [
        Mistake("the update is not multiplied by alpha / rank: the update is scale · (alpha / rank) · B A x",
                wrong("no_ratio")),
        Mistake("alpha / rank is inverted (rank / alpha): the update is scale · (alpha / rank) · B A x",
                wrong("inverted")),
        Mistake("A and B are swapped: A (rank × in) comes first and squeezes x to rank numbers, B (out × rank) "
                "spreads them back, B A x", wrong("swapped")),
        Mistake("the frozen layer's own output W x + bias is missing: LoRA adds its update to it", wrong("no_base")),
        Mistake("the scale is applied twice: multiply the update by scale once", wrong("scale_twice")),
        Mistake("the user's scale is missing: the update is scale · (alpha / rank) · B A x", wrong("no_scale")),
        Mistake("this is the frozen layer alone: add the update scale · (alpha / rank) · B A x (when the layer "
                "is not merged)", wrong("base_only")),
    ]
    hint = ("the frozen layer's output, plus (while not merged) the input squeezed by A to rank numbers, spread "
            "back by B, times scale and alpha over rank")
    try:
        check_module("check_lora_layer", cls, LoRALayer, _lora_cases(), mistakes, hint=hint,
                     reference_name="sd.adapters.lora.LoRALayer", exercise="12.2")
    except NotImplementedError:
        raise
    with torch.random.fork_rng(devices=[]):
        _lora_behaviour(cls, "check_lora_layer")
    print("   ... and forward leaves W alone, gives the same output twice, sends gradients to x, A and B only; "
          "merge and unmerge fold the update in and out of W")
    return True


# ----------------------------------------------------------------------------------------------------------
# Exercise 12.3: wrapping a model's attention projections with LoRA
# ----------------------------------------------------------------------------------------------------------

_WRAP_RANK = 2


def reference_wrap_with_lora(model: nn.Module, rank: int, lora_class: type = LoRALayer) -> list[nn.Parameter]:
    """Freeze `model`, replace every nn.Linear named like one of UNET_TARGETS by lora_class(layer, rank) in its
    parent, and return the new A and B weights (as `sd.adapters.lora.add_lora`, with the class given)."""
    names = [n for n, m in model.named_modules()
             if n.rpartition(".")[2] in UNET_TARGETS and isinstance(m, nn.Linear)]
    model.requires_grad_(False)                                   # 1. freeze first: the new A and B stay trainable
    params = []
    for name in names:                                            # 2. names first, then replace (no loop over a
        parent_name, _, child = name.rpartition(".")              #    module tree that is being changed)
        parent = model.get_submodule(parent_name)
        layer = lora_class(getattr(parent, child), rank)
        setattr(parent, child, layer)
        params += [layer.lora_A.weight, layer.lora_B.weight]
    return params


def _wrap_model() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A small random UNet of SD's layout (attention at both levels, feed-forwards, time MLP: Linear layers that
    are not projections) and an input for it."""
    with seeded(110):
        unet = DiffusionUNET(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                        heads=2, context_dim=32, norm_groups=8, sample_size=4)).eval()
        inputs = (randn(2, 4, 4, 4), randn(2, 5, 32), torch.tensor([10, 500]))
    return unet, inputs


def _names(items) -> str:
    items = sorted(items)
    return ", ".join(items[:4]) + (f", ... ({len(items) - 4} more)" if len(items) > 4 else "")


def check_wrap_with_lora(fn) -> bool:
    """Exercise 12.3: fn(model, rank, lora_class) wraps every attention projection (to_q, to_k, to_v, to_out) of
    the model in lora_class, freezes the rest and returns the new A and B weights."""
    require_callable("check_wrap_with_lora", fn, "a function")
    where = "check_wrap_with_lora failed on a small UNet of SD's layout"
    original, (x, context, t) = _wrap_model()
    expected = {n for n, m in original.named_modules()
                if n.rpartition(".")[2] in UNET_TARGETS and isinstance(m, nn.Linear)}
    model = copy.deepcopy(original)
    before = {n: m for n, m in model.named_modules() if n in expected}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        try:
            params = fn(model, _WRAP_RANK, LoRALayer)
        except NotImplementedError:
            raise
        except Exception as e:
            raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                 + _more_help("12.3")) from e
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not wrappers:
        raise AssertionError(f"{where}:\n  no layer of the model is a LoRA layer afterwards: replace each projection "
                             "by its wrapper in the projection's parent module (the attention block), under the "
                             "projection's own name")
    nested = [n for n, m in wrappers.items() if isinstance(m.base, LoRALayer)]
    if nested:
        raise AssertionError(f"{where}:\n  some projections are wrapped twice ({_names(nested)}): find the names "
                             "first, then wrap each once")
    extra, missing = set(wrappers) - expected, expected - set(wrappers)
    if extra:
        raise AssertionError(f"{where}:\n  layers that are not attention projections were wrapped ({_names(extra)}): "
                             "wrap only the layers whose own name is one of to_q, to_k, to_v, to_out")
    if missing:
        raise AssertionError(f"{where}:\n  {len(missing)} of the {len(expected)} attention projections were not "
                             f"wrapped ({_names(missing)}): every layer whose own name is one of to_q, to_k, to_v, "
                             "to_out, in self- and cross-attention alike")
    swapped = [n for n, m in wrappers.items() if m.base is not before[n]]
    if swapped:
        raise AssertionError(f"{where}:\n  the wrappers do not hold the model's own layers ({_names(swapped)}): wrap "
                             "the projection that is there, with its trained weights")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {f"{n}.lora_{ab}.weight" for n in wrappers for ab in "AB"}
    if trainable - lora_names:
        raise AssertionError(f"{where}:\n  {len(trainable - lora_names)} of the model's own weights are still "
                             f"trainable ({_names(trainable - lora_names)}): freeze the whole model before adding "
                             "the LoRA layers, so that only A and B train")
    if lora_names - trainable:
        raise AssertionError(f"{where}:\n  A and B are frozen too ({_names(lora_names - trainable)}): freeze the "
                             "model first, then add the LoRA layers, whose A and B are trainable")
    try:
        got = list(params)
    except TypeError:
        raise AssertionError(f"{where}:\n  the function should return the list of the new A and B weights, got "
                             f"{_kind(params)}") from None
    wanted = {id(m.lora_A.weight) for m in wrappers.values()} | {id(m.lora_B.weight) for m in wrappers.values()}
    if {id(p) for p in got} != wanted or len(got) != len(wanted):
        raise AssertionError(f"{where}:\n  the list returned should hold each new A and B weight once "
                             f"({len(wanted)} of them), got {len(got)} items of which "
                             f"{len({id(p) for p in got} & wanted)} are A or B weights")
    with torch.no_grad():
        same = torch.allclose(model(x, context, t), original(x, context, t), atol=ATOL, rtol=RTOL)
    if not same:
        raise AssertionError(f"{where}:\n  the wrapped model's output differs from the original's before any "
                             "training: with B = 0, LoRA must change nothing" + _unknown_mistake("12.3"))
    with torch.enable_grad():
        model(x, context, t).square().mean().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    if reached - lora_names:
        raise AssertionError(f"{where}:\n  gradients reached weights other than A and B "
                             f"({_names(reached - lora_names)})" + _unknown_mistake("12.3"))
    print(f"✅ check_wrap_with_lora passed: the {len(expected)} attention projections of a small UNet of SD's layout "
          f"wrapped, the rest frozen, {len(wanted)} A and B weights returned, the output unchanged at the start")
    return True


# ----------------------------------------------------------------------------------------------------------
# Exercise: one step of textual inversion
# ----------------------------------------------------------------------------------------------------------

def reference_textual_inversion_step(pipe, latents: torch.Tensor, prompts: list[str], token_ids: list[int],
                                     optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
    """One step of learning the rows `token_ids` of CLIP's embedding table, Gal et al. 2022, eq. 2; returns the loss."""
    # 1. the prompts' text states, differentiable in the embedding table
    context = pipe.clip(pipe.tokenizer(prompts).to(latents.device))            # (B, 77, D)
    # 2. SD's noise-prediction loss: a timestep, then the noise, from the generator (Ho et al. 2020, algorithm 1)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(latents.device)
    t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator).to(latents.device)  # (B,)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)                           # (B,) -> (B, 1, 1, 1)
    z_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    loss = F.mse_loss(pipe.unet(z_t, context, t).float(), noise)
    # 3. the gradient, kept only on the new word's rows, and the optimizer's step
    optimizer.zero_grad()
    loss.backward()
    weight = pipe.clip.embedding.token_embedding.weight
    keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[token_ids] = True
    weight.grad[~keep] = 0
    optimizer.step()
    return loss.item()


# A small random pipeline for the check: the shipped model's tokenizer, a one-layer CLIP, a two-level UNet. It
# learns _CHECK_WORD; _OTHER_WORD is added after it, so the word learned is NOT the table's last row, and the
# prompts use both, so a step that keeps the last row instead of token_ids moves the wrong one.
_CHECK_WORD, _OTHER_WORD = "<new-word>", "<other-word>"
_CHECK_LR = 1e-2
_CHECK_STEPS = 2            # two steps: a gradient left over from the first (no zero_grad) shows in the second
_CHECK_PROMPTS = ("a red <new-word> on a blue background", "a <new-word> next to an <other-word>")


def _small_pipeline(seed: int) -> tuple[StableDiffusion, list[int]]:
    """A random small pipeline that knows _CHECK_WORD and then _OTHER_WORD (one new row each); _CHECK_WORD's ids."""
    tokenizer = CLIPTokenizer(DEFAULT_MODEL.parent / "default_model_tokenizer")
    with seeded(seed):
        clip = CLIP(CLIPConfig(vocab_size=len(tokenizer), width=32, layers=1, heads=2, mlp_width=64))
        unet = DiffusionUNET(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                        heads=2, context_dim=32, norm_groups=8, sample_size=4))
        vae = VAEConfig(block_channels=(8, 8), layers_per_block=1, norm_groups=4)
        pipe = StableDiffusion(clip.eval(), VAE_Encoder(vae).eval(), VAE_Decoder(vae).eval(), unet.eval(), tokenizer)
        ids = tokenizer.add_token(_CHECK_WORD)
        add_token_rows(clip, ids, 0.1 * randn(1, 32))
        other = tokenizer.add_token(_OTHER_WORD)
        add_token_rows(clip, other, 0.1 * randn(1, 32))
    return pipe, ids


def _train(step, seed: int):
    """(losses, the pipeline afterwards, the word's ids, the embedding table before) of _CHECK_STEPS steps."""
    pipe, ids = _small_pipeline(seed)
    with seeded(seed + 1):
        latents = randn(len(_CHECK_PROMPTS), 4, 4, 4)
    table = pipe.clip.embedding.token_embedding.weight.detach().clone()
    optimizer = textual_inversion_optimizer(pipe, lr=_CHECK_LR)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        losses = [step(pipe, latents.clone(), list(_CHECK_PROMPTS), list(ids), optimizer, generator)
                  for _ in range(_CHECK_STEPS)]
    if not all(isinstance(v, (float, int, torch.Tensor)) for v in losses):
        raise AssertionError(f"the step should return the loss as a number (a Python float), got {losses[0]!r}")
    return losses, pipe, ids, table


def _runner(step):
    """A function of a case that trains a fresh small pipeline with `step` and returns (losses, embedding table)."""
    def run(seed: int):
        losses, pipe, _, _ = _train(step, seed)
        losses = torch.tensor([float(v) for v in losses])             # (steps,)
        return losses, pipe.clip.embedding.token_embedding.weight.detach().clone()
    run.__name__ = run.__qualname__ = getattr(step, "__name__", "step")
    run.__module__ = getattr(step, "__module__", "?")
    return run


def _textual_inversion_behaviour(fn, check_name: str) -> None:
    """Only the rows token_ids move (the word is not the table's last row); no gradient reaches a network."""
    where = f"{check_name} failed on a small random pipeline that learns the word {_CHECK_WORD} (row R below)"
    with torch.random.fork_rng(devices=[]):
        try:
            _, pipe, ids, table = _train(fn, seed=0)
        except (NotImplementedError, AssertionError):
            raise
        except Exception as e:
            raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                 + _more_help("12.1")) from e
    after = pipe.clip.embedding.token_embedding.weight.detach()
    moved = set((after - table).abs().amax(dim=1).nonzero().flatten().tolist())
    last = len(table) - 1
    where = where.replace("row R", f"row {ids[0]}; the table has {len(table)} rows")
    if moved - set(ids):
        others = sorted(moved - set(ids))
        shown = ", ".join(map(str, others[:5])) + (f", ... ({len(others)} rows)" if len(others) > 5 else "")
        if last in moved and not set(ids) & moved:
            raise AssertionError(f"{where}:\n  the table's last row ({last}) moved and the word's row {ids[0]} did "
                                 "not: keep the gradient on the rows token_ids, wherever they are in the table (a "
                                 "word added before another is not the last row)")
        raise AssertionError(f"{where}:\n  rows other than token_ids moved ({shown}): zero the gradient of every "
                             "row but token_ids between the backward pass and the optimizer's step")
    if not moved:
        raise AssertionError(f"{where}:\n  no row of the embedding table moved: the loss's gradient must reach the "
                             "word's row through the text encoder (encode the prompts with gradients), and the "
                             "optimizer must step")
    touched = [n for n, p in list(pipe.unet.named_parameters()) + list(pipe.clip.named_parameters())
               if p.grad is not None and "token_embedding" not in n]
    if touched:
        raise AssertionError(f"{where}:\n  gradients reached the frozen networks' weights ({_names(touched)}): "
                             "only the embedding table trains")


def _wrong_step(kind: str):
    """The reference step done one typical wrong way."""
    def step(pipe, latents, prompts, token_ids, optimizer, generator):
        context = pipe.clip(pipe.tokenizer(prompts))
        alphas_cumprod = pipe.scheduler.alphas_cumprod
        if kind == "noise_first":
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)
        else:
            t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        target = latents if kind == "x0" else noise
        loss = F.mse_loss(pipe.unet(z_t, context, t), target)
        if kind != "no_zero_grad":
            optimizer.zero_grad()
        loss.backward()
        weight = pipe.clip.embedding.token_embedding.weight
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[[weight.shape[0] - 1] if kind == "last_row" else token_ids] = False
        if kind != "all_rows":
            weight.grad[others] = 0
        optimizer.step()
        return loss.item()
    return step


def check_textual_inversion_step(fn) -> bool:
    """Exercise 12.1: fn(pipe, latents, prompts, token_ids, optimizer, generator) -> the loss: one step that moves
    the rows token_ids of the embedding table and nothing else."""
    require_callable("check_textual_inversion_step", fn, "a function")
    cases = [Case({"seed": seed}) for seed in (0, 1)]

    def wrong(kind):
        return lambda ref, case: _runner(_wrong_step(kind))(case.inputs["seed"])

    mistakes = [
        Mistake("every row of the embedding table moved: zero the gradient of all rows but token_ids between the "
                "backward pass and the optimizer's step, so that only the new word is learned", wrong("all_rows")),
        Mistake("the table's last row learned instead of the rows token_ids: the word need not be the last row",
                wrong("last_row")),
        Mistake("the loss compares the UNet's output with the clean latent: SD's UNet predicts the noise, so the "
                "loss is the mean squared error between its output and the noise", wrong("x0")),
        Mistake("the gradient of the previous step is still there: zero the gradients before the backward pass",
                wrong("no_zero_grad")),
        Mistake("the noise is drawn before the timestep: draw t first, then the noise, from the generator (the "
                "check compares with the reference drawn in that order)", wrong("noise_first")),
    ]
    _textual_inversion_behaviour(fn, "check_textual_inversion_step")
    return check_function("check_textual_inversion_step", _runner(fn),
                          _runner(reference_textual_inversion_step), cases, mistakes,
                          hint="the prompts encoded with gradients; the loss of exercise 10.1 on the latents and "
                               "those text states; zero the gradients, backward, zero the gradient of every row "
                               "but token_ids, step",
                          reference_name="sd.adapters.textual_inversion.textual_inversion_step "
                                         "(reference_textual_inversion_step)", exercise="12.1")


# ----------------------------------------------------------------------------------------------------------
# Exercise 12.4: DreamBooth's prior-preservation loss
# ----------------------------------------------------------------------------------------------------------

# An instance batch and a class batch of different sizes, so that splitting the prediction in two halves (instead
# of after the instance pictures) gives other numbers; three weights λ, so that each wrong weighting shows.
_PRIOR_SIZES = (3, 2)
_PRIOR_WEIGHTS = (1.0, 0.5, 2.0)


def _prior_model() -> nn.Module:
    """The small UNet of SD's layout, wrapped with LoRA whose A and B are random (B = 0 would hide A's gradient)."""
    unet, _ = _wrap_model()
    with seeded(120):
        reference_wrap_with_lora(unet, _WRAP_RANK, LoRALayer)
        for module in unet.modules():
            if isinstance(module, LoRALayer):
                nn.init.normal_(module.lora_B.weight, std=0.1)
    return unet


def _prior_inputs(seed: int) -> dict:
    """Clean latents and text states of an instance batch and a class batch, (N, 4, 4, 4) and (N, 5, 32)."""
    b, c = _PRIOR_SIZES
    with seeded(seed):
        return {"instance_latents": randn(b, 4, 4, 4), "instance_context": randn(1, 5, 32).expand(b, 5, 32).clone(),
                "class_latents": randn(c, 4, 4, 4), "class_context": randn(c, 5, 32)}


def _prior_call(fn, model: nn.Module, inputs: dict, seed: int, weight: float):
    """fn's loss on fresh copies of the inputs, with a generator seeded by `seed`."""
    args = {k: v.clone() for k, v in inputs.items()}
    return fn(model, DiffusionScheduler(), args["instance_latents"], args["instance_context"], args["class_latents"],
              args["class_context"], torch.Generator().manual_seed(seed), weight)


def _prior_runner(fn):
    """A function of a case: (the loss, the gradient of every LoRA weight after its backward pass)."""
    def run(seed: int, weight: float):
        model = _prior_model()
        with torch.enable_grad():
            loss = _prior_call(fn, model, _prior_inputs(seed), seed, weight)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise AssertionError(f"the function should return the loss as a one-number tensor, got {_kind(loss)}")
        if loss.grad_fn is None:
            raise AssertionError("the loss returned has no gradient: return the loss tensor itself (not a "
                                 "Python number, not detached), so that the training loop can back-propagate it")
        with torch.enable_grad():
            loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
        grads = [torch.zeros(1) if g is None else g.flatten() for g in grads]
        return loss.detach(), torch.cat(grads)
    run.__name__ = run.__qualname__ = getattr(fn, "__name__", "loss")
    run.__module__ = getattr(fn, "__module__", "?")
    return run


def _prior_behaviour(fn, check_name: str) -> None:
    """Gradients reach only the LoRA; the class batch does not enter the instance term, and is trained with the
    class prompt; λ weights the prior term (the loss and its gradient are affine in λ)."""
    where = f"{check_name} failed on a small UNet of SD's layout with LoRA on its attention projections"
    run = _prior_runner(fn)
    with torch.random.fork_rng(devices=[]):
        try:
            model = _prior_model()
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            inputs = _prior_inputs(0)
            with torch.enable_grad():
                loss = _prior_call(fn, model, inputs, 0, 1.0)
            if isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
                with torch.enable_grad():
                    loss.backward()
            reached = {n for n, p in model.named_parameters() if p.grad is not None}
            now_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            zero, one, three = (run(0, w) for w in (0.0, 1.0, 3.0))
            with seeded(130):                                     # other class pictures and prompt states
                other = dict(inputs, class_latents=randn(*inputs["class_latents"].shape),
                             class_context=3 * randn(*inputs["class_context"].shape))
            zero_other = _prior_call(fn, _prior_model(), other, 0, 0.0).detach()
            one_other = _prior_call(fn, _prior_model(), dict(inputs, class_context=other["class_context"]), 0,
                                    1.0).detach()
        except NotImplementedError:
            raise
        except AssertionError as e:
            raise AssertionError(f"{where}:\n  {e}") from None
        except Exception as e:
            raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                 + _more_help("12.4")) from e
    if now_trainable != trainable:
        raise AssertionError(f"{where}:\n  the loss changed which weights train ({_names(now_trainable ^ trainable)}):"
                             " it must only compute the loss; the LoRA's A and B train, the UNet stays frozen")
    lora = {n for n in trainable if ".lora_" in n}
    if reached - lora:
        raise AssertionError(f"{where}:\n  gradients reached weights other than the LoRA's A and B "
                             f"({_names(reached - lora)})" + _unknown_mistake("12.4"))
    if lora - reached:
        raise AssertionError(f"{where}:\n  no gradient reached some of the LoRA's weights ({_names(lora - reached)}): "
                             "the loss must come from the UNet's prediction, kept in the autograd graph")
    if not torch.allclose(zero_other, zero[0], atol=ATOL, rtol=RTOL):
        raise AssertionError(f"{where}:\n  with λ = 0 the loss still depends on the class pictures: the class "
                             "batch is being trained as if it were the instance. The instance term is the mean "
                             "squared error over the instance pictures only, the prior term over the class "
                             "pictures only, and λ multiplies the prior term, nothing else")
    if not float(one[0] - zero[0]) > 0:
        raise AssertionError(f"{where}:\n  λ changes nothing: add λ times the class pictures' mean squared "
                             "error to the instance pictures'")
    if torch.allclose(one_other, one[0], atol=ATOL, rtol=RTOL):
        raise AssertionError(f"{where}:\n  the loss does not depend on the class prompt's text states: the class "
                             "pictures must be denoised with the class prompt (class_context), the instance "
                             "pictures with the instance prompt")
    loss_3, grad_3 = three
    affine_loss, affine_grad = zero[0] + 3 * (one[0] - zero[0]), zero[1] + 3 * (one[1] - zero[1])
    if not (torch.allclose(loss_3, affine_loss, atol=ATOL, rtol=RTOL)
            and torch.allclose(grad_3, affine_grad, atol=ATOL, rtol=RTOL)):
        raise AssertionError(f"{where}:\n  λ does not weight the prior term: the loss at λ = 3 "
                             f"({float(loss_3):.4g}) should be the loss at 0 plus 3 times the prior term (the loss "
                             f"at 1 minus the loss at 0), {float(affine_loss):.4g}, and its gradient likewise")


def _wrong_prior(kind: str):
    """The reference loss computed one typical wrong way."""
    def loss_fn(unet, scheduler, instance_latents, instance_context, class_latents, class_context, generator,
                prior_weight):
        n = len(instance_latents)
        if kind == "class_first":
            z0 = torch.cat([class_latents, instance_latents])
            context = torch.cat([class_context, instance_context])
        else:
            z0 = torch.cat([instance_latents, class_latents])
            context = torch.cat([instance_context, class_context])
        if kind == "noise_first":
            eps = torch.randn(z0.shape, generator=generator)
            t = torch.randint(0, scheduler.num_train_timesteps, (len(z0),), generator=generator)
        else:
            t = torch.randint(0, scheduler.num_train_timesteps, (len(z0),), generator=generator)
            eps = torch.randn(z0.shape, generator=generator)
        pred = unet(scheduler.add_noise(z0, eps, t), context, t).float()
        target = z0 if kind == "x0" else eps
        if kind == "class_first":
            pred, target = torch.cat([pred[len(class_latents):], pred[:len(class_latents)]]), \
                torch.cat([target[len(class_latents):], target[:len(class_latents)]])
        if kind == "halves":
            n = len(z0) // 2
        instance = F.mse_loss(pred[:n], target[:n])
        prior = F.mse_loss(pred[n:], target[n:])
        return {"one_mean": F.mse_loss(pred, target), "weight_on_instance": prior_weight * instance + prior,
                "no_weight": instance + prior, "average": (instance + prior_weight * prior) / 2,
                "instance_only": instance + 0 * prior}.get(kind, instance + prior_weight * prior)
    return loss_fn


def check_prior_preservation_loss(fn) -> bool:
    """Exercise 12.4: fn(unet, scheduler, instance_latents, instance_context, class_latents, class_context,
    generator, prior_weight) -> the instance pictures' noise-prediction MSE plus prior_weight times the class
    pictures', from one batch noised with the generator's timesteps, then noise."""
    require_callable("check_prior_preservation_loss", fn, "a function")
    _prior_behaviour(fn, "check_prior_preservation_loss")
    cases = [Case({"seed": seed, "weight": weight}) for seed, weight in zip((1, 2, 3), _PRIOR_WEIGHTS)]

    def wrong(kind):
        return lambda ref, case: _prior_runner(_wrong_prior(kind))(**case.inputs)

    mistakes = [
        Mistake("the two terms are averaged: Ruiz et al.'s eq. 2 adds them, instance term plus λ times the "
                "prior term", wrong("average")),
        Mistake("the prediction is split in two equal halves: the instance part is as long as the instance batch, "
                "which need not be as long as the class batch", wrong("halves")),
        Mistake("the UNet's output is compared with the clean latents: SD's UNet predicts the noise, in both terms",
                wrong("x0")),
        Mistake("the noise is drawn before the timesteps: draw the timesteps of the whole batch first, then its "
                "noise (the check compares with the reference drawn in that order)", wrong("noise_first")),
        Mistake("the class pictures come first in the batch: put the instance pictures first, then the class "
                "pictures (the random numbers then fall as in the reference)", wrong("class_first")),
    ]
    return check_function("check_prior_preservation_loss", _prior_runner(fn), _prior_runner(prior_preservation_loss),
                          cases, mistakes,
                          hint="one batch of the instance pictures then the class pictures, each with its own "
                               "text states; timesteps, then noise, from the generator; one UNet call; the "
                               "instance part's mean squared error plus λ times the class part's",
                          reference_name="sd.adapters.prior_preservation.prior_preservation_loss", exercise="12.4")
