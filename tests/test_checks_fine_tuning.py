"""The fine-tuning notebook's checks: the references are what sd.adapters and PEFT compute, mistakes are named,
and what is trained is checked by its behaviour (gradients, side effects), each behaviour mistake by a test.

The LoRA check's reference, sd.adapters.lora.LoRALayer, must give PEFT's LoRA Linear on the same weights; the
textual-inversion reference step must be sd.adapters.textual_inversion.textual_inversion_step (same losses, same
embedding table after two steps, on the shipped small model); the wrapping reference wraps what add_lora wraps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd
from sd.adapters.lora import LoRALayer
from sd.adapters.textual_inversion import add_token_rows, textual_inversion_optimizer, textual_inversion_step
from sd.adapters.prior_preservation import prior_preservation_loss
from sd.course.checks import (check_lora_layer, check_prior_preservation_loss, check_textual_inversion_step,
                              check_wrap_with_lora, pick)
from sd.course.checks.fine_tuning import _wrong_prior, reference_textual_inversion_step, reference_wrap_with_lora
from tests.check_helpers import rejects, rejects_unrecognised


# ---------------------------------------------------------------------------------------------------------
# The references are sd.adapters' computations (and PEFT's)
# ---------------------------------------------------------------------------------------------------------

def test_lora_reference_is_peft_lora_linear():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    nn.init.normal_(peft_layer.lora_B["default"].weight)            # trained-looking B, not PEFT's zeros
    ours = LoRALayer(model[0], rank=4, alpha=8)
    with torch.no_grad():
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), peft_layer(x), atol=1e-6, rtol=1e-6)
    assert (ours(x) - model[0](x)).abs().max() > 1e-2                   # the update is really there


def test_lora_reference_scale_multiplies_the_update():
    torch.manual_seed(1)
    base = nn.Linear(8, 8)
    layer = LoRALayer(base, rank=2, alpha=6, scale=1.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    update = layer(x) - base(x)
    layer.scale = 0.3
    torch.testing.assert_close(layer(x) - base(x), 0.3 * update)
    torch.testing.assert_close(update, 3.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)   # alpha / r = 3


def _shipped_with_word(seed: int = 0):
    torch.manual_seed(seed)
    pipe = sd.load_checkpoint()
    ids = pipe.tokenizer.add_token("<star>")
    add_token_rows(pipe.clip, ids, torch.randn(1, pipe.clip.config.width))
    return pipe, ids


def test_reference_textual_inversion_step_is_sd_adapters_step_on_the_shipped_model():
    runs = []
    for step in (reference_textual_inversion_step, textual_inversion_step):
        pipe, ids = _shipped_with_word()
        latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        optimizer = textual_inversion_optimizer(pipe, lr=1e-2)
        generator = torch.Generator().manual_seed(2)
        losses = [step(pipe, latents, ["a red <star> on a blue background"] * 3, ids, optimizer, generator)
                  for _ in range(2)]
        runs.append((losses, pipe.clip.embedding.token_embedding.weight.detach().clone(), ids))
    (ref_losses, ref_table, ids), (sd_losses, sd_table, _) = runs
    assert ref_losses == pytest.approx(sd_losses, rel=1e-6)
    torch.testing.assert_close(ref_table, sd_table, atol=1e-6, rtol=1e-6)
    fresh = sd.load_checkpoint().clip.embedding.token_embedding.weight
    assert torch.equal(ref_table[:-1], fresh)                           # only the new row moved
    assert not torch.equal(ref_table[ids], _shipped_with_word()[0].clip.embedding.token_embedding.weight[ids])


def test_wrap_reference_wraps_the_layers_sd_add_lora_wraps():
    from sd.adapters.lora import add_lora, lora_layers
    from sd.course.checks.fine_tuning import _wrap_model
    ours, _ = _wrap_model()
    theirs = copy.deepcopy(ours)
    params = reference_wrap_with_lora(ours, 2)
    their_params = add_lora(theirs, rank=2)
    assert sorted(lora_layers(ours)) == sorted(lora_layers(theirs)) and len(lora_layers(ours)) == 56
    assert len(params) == len(their_params) == 112
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# Correct learner code passes
# ---------------------------------------------------------------------------------------------------------

class MyLoRALinear(nn.Module):
    """The notebook's class, written with explicit matrix products."""

    def __init__(self, base, rank, alpha=None, scale=1.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.rank, self.alpha, self.scale = rank, float(rank if alpha is None else alpha), float(scale)
        self.merged = False

    def delta(self):
        return self.scale * self.alpha / self.rank * (self.lora_B.weight @ self.lora_A.weight)   # (out, in)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x) + x @ self.delta().T

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.delta()
        self.merged = False


def my_wrap_with_lora(model, rank, lora_class):
    """Recursive, over the children, wrapping as it goes."""
    model.requires_grad_(False)
    params = []

    def visit(module):
        for name, child in list(module.named_children()):
            if name in ("to_q", "to_k", "to_v", "to_out") and isinstance(child, nn.Linear):
                layer = lora_class(child, rank)
                setattr(module, name, layer)
                params.extend([layer.lora_A.weight, layer.lora_B.weight])
            else:
                visit(child)

    visit(model)
    return params


def my_textual_inversion_step(pipe, latents, prompts, token_ids, optimizer, generator):
    """With the scheduler's add_noise, and a mask of the new rows multiplied into the gradient."""
    context = pipe.clip(pipe.tokenizer(prompts))
    t = torch.randint(0, pipe.scheduler.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    loss = F.mse_loss(pipe.unet(pipe.scheduler.add_noise(latents, noise, t), context, t), noise)
    optimizer.zero_grad()
    loss.backward()
    weight = pipe.clip.embedding.token_embedding.weight
    mask = torch.zeros(weight.shape[0], 1)
    mask[token_ids] = 1
    weight.grad *= mask
    optimizer.step()
    return loss.item()


def test_checks_pass_the_references_and_correct_learner_code(capsys):
    from sd.adapters.lora import add_lora
    assert check_lora_layer(MyLoRALinear)
    assert check_wrap_with_lora(reference_wrap_with_lora) and check_wrap_with_lora(my_wrap_with_lora)
    assert check_wrap_with_lora(lambda model, rank, lora_class: add_lora(model, rank))
    assert check_textual_inversion_step(reference_textual_inversion_step)
    assert check_textual_inversion_step(textual_inversion_step)
    assert check_textual_inversion_step(my_textual_inversion_step)
    lines = capsys.readouterr().out.splitlines()
    passed = [line for line in lines if line.startswith("✅ check_")]
    assert len(passed) == 7 and all(" passed: " in line for line in passed)


def test_lora_reference_has_no_merge_so_the_layer_check_asks_for_one():
    rejects(check_lora_layer, LoRALayer, "has no method merge")


# ---------------------------------------------------------------------------------------------------------
# Done wrong: named mistakes, behaviour (gradients, side effects), unknown mistakes without code
# ---------------------------------------------------------------------------------------------------------

def lora_with(**methods):
    return type("WrongLoRA", (MyLoRALinear,), methods)


@pytest.mark.parametrize("forward, mistake", [
    (lambda s, x: s.base(x) + s.scale * s.lora_B(s.lora_A(x)), "not multiplied by alpha / rank"),
    (lambda s, x: s.base(x) + s.scale * s.rank / s.alpha * s.lora_B(s.lora_A(x)), "inverted (rank / alpha)"),
    (lambda s, x: s.base(x) + s.scale * s.alpha / s.rank * (x @ s.lora_B.weight @ s.lora_A.weight),
     "A and B are swapped"),
    (lambda s, x: s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x)), "frozen layer's own output W x + bias is missing"),
    (lambda s, x: s.base(x) + s.scale * s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x)), "applied twice"),
    (lambda s, x: s.base(x) + s.alpha / s.rank * s.lora_B(s.lora_A(x)), "user's scale is missing"),
])
def test_check_lora_layer_names_the_mistake(forward, mistake):
    rejects(check_lora_layer, lora_with(forward=forward), "check_lora_layer failed", "Hint: ", mistake)


def _detached_base(s, x):
    return s.base(x).detach() + s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x))


def _merges_inside_forward(s, x):
    with torch.no_grad():
        s.base.weight += s.delta()
    return s.base(x)


def test_check_lora_layer_rejects_a_detached_base_output():
    rejects(check_lora_layer, lora_with(forward=_detached_base), "check_lora_layer failed",
            "lacks the frozen layer's part", "detached")


def test_check_lora_layer_rejects_merging_into_the_weight_inside_forward():
    rejects(check_lora_layer, lora_with(forward=_merges_inside_forward), "check_lora_layer failed",
            "forward changed the frozen weight W")


def test_check_lora_layer_rejects_an_update_cut_from_the_graph():
    def forward(s, x):
        with torch.no_grad():
            update = s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x))
        return s.base(x) + update

    rejects(check_lora_layer, lora_with(forward=forward), "no gradient reaches A")


@torch.no_grad()
def _merge_without_factor(s):
    s.base.weight += s.lora_B.weight @ s.lora_A.weight
    s.merged = True


@torch.no_grad()
def _merge_transposed(s):
    s.base.weight += s.delta().T if s.delta().shape[0] == s.delta().shape[1] else s.delta()
    s.merged = True


@torch.no_grad()
def _merge_without_flag(s):
    s.base.weight += s.delta()


@torch.no_grad()
def _unmerge_flag_only(s):
    s.merged = False


@pytest.mark.parametrize("methods, mistake", [
    ({"merge": _merge_without_factor}, "merge added the update without its factor"),
    ({"merge": _merge_transposed}, "merge added the update transposed"),
    ({"merge": _merge_without_flag}, "adds the update a second time"),
    ({"unmerge": _unmerge_flag_only}, "unmerge did not give W back"),
])
def test_check_lora_layer_names_merge_mistakes(methods, mistake):
    rejects(check_lora_layer, lora_with(**methods), "check_lora_layer failed", mistake)


def test_check_lora_layer_rejects_an_unknown_mistake_without_code():
    def forward(s, x):                          # the update computed from the bias-free input's absolute value
        return s.base(x) + s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x.abs()))

    rejects_unrecognised(check_lora_layer, lora_with(forward=forward), "12.2")


def _wrap(kind):
    def wrap(model, rank, lora_class):
        if kind != "frozen_after":
            model.requires_grad_(kind == "not_frozen")
        targets = ("to_q", "to_k", "to_v") if kind == "no_to_out" else ("to_q", "to_k", "to_v", "to_out")
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and (kind == "every_linear" or n.rpartition(".")[2] in targets)]
        params = []
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = lora_class(getattr(parent, child), rank)
            if kind == "twice":
                layer = lora_class(layer, rank)
            setattr(parent, child, layer)
            params += [layer.lora_A.weight, layer.lora_B.weight]
        if kind == "frozen_after":
            model.requires_grad_(False)
        return None if kind == "returns_nothing" else params
    return wrap


@pytest.mark.parametrize("kind, mistake", [
    ("every_linear", "layers that are not attention projections were wrapped"),
    ("no_to_out", "attention projections were not wrapped"),
    ("not_frozen", "of the model's own weights are still trainable"),
    ("frozen_after", "A and B are frozen too"),
    ("twice", "wrapped twice"),
    ("returns_nothing", "should return the list of the new A and B weights"),
])
def test_check_wrap_with_lora_names_the_mistake(kind, mistake):
    rejects(check_wrap_with_lora, _wrap(kind), "check_wrap_with_lora failed", mistake)


def test_check_wrap_with_lora_rejects_an_unknown_mistake_without_code():
    def wrap_and_perturb(model, rank, lora_class):   # a "fresh" LoRA whose B is not zero changes the output
        params = reference_wrap_with_lora(model, rank, lora_class)
        with torch.no_grad():
            for p in params:
                p.add_(0.1)
        return params

    rejects_unrecognised(check_wrap_with_lora, wrap_and_perturb, "12.3")


def _ti_step(kind):
    def step(pipe, latents, prompts, token_ids, optimizer, generator):
        context = pipe.clip(pipe.tokenizer(prompts))
        if kind == "noise_first":
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (len(latents),), generator=generator)
        else:
            t = torch.randint(0, 1000, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
        z_t = pipe.scheduler.add_noise(latents, noise, t)
        prediction = pipe.unet(z_t, context, t)
        target = latents if kind == "x0" else noise
        loss = F.l1_loss(prediction, target) if kind == "l1" else F.mse_loss(prediction, target)
        if kind != "no_zero_grad":
            optimizer.zero_grad()
        loss.backward()
        weight = pipe.clip.embedding.token_embedding.weight
        if kind != "all_rows":
            keep = torch.zeros(weight.shape[0], dtype=torch.bool)
            keep[[-1] if kind == "last_row" else token_ids] = True
            weight.grad[~keep] = 0
        optimizer.step()
        return loss.item()
    return step


@pytest.mark.parametrize("kind, mistake", [
    ("all_rows", "rows other than token_ids moved"),
    ("last_row", "the table's last row"),
    ("x0", "compares the UNet's output with the clean latent"),
    ("no_zero_grad", "gradient of the previous step is still there"),
    ("noise_first", "noise is drawn before the timestep"),
])
def test_check_textual_inversion_step_names_the_mistake(kind, mistake):
    rejects(check_textual_inversion_step, _ti_step(kind), "check_textual_inversion_step failed", mistake)


def test_check_textual_inversion_step_rejects_protecting_the_last_row_for_a_word_that_is_not_last():
    message = rejects(check_textual_inversion_step, _ti_step("last_row"), "did not")
    assert "wherever they are in the table" in message


def test_check_textual_inversion_step_rejects_an_unknown_mistake_without_code():
    rejects_unrecognised(check_textual_inversion_step, _ti_step("l1"), "12.1")


def test_textual_inversion_step_returning_the_tensor_is_accepted_and_none_is_explained():
    def returns_tensor(*args):
        loss = reference_textual_inversion_step(*args)
        return torch.tensor(loss)

    def returns_nothing(*args):
        reference_textual_inversion_step(*args)

    assert check_textual_inversion_step(returns_tensor)
    rejects(check_textual_inversion_step, returns_nothing, "should return the loss as a number")


def test_pick_goes_on_with_the_reference_when_the_exercise_is_not_done(capsys):
    class Stub(MyLoRALinear):
        def forward(self, x):
            raise NotImplementedError("Exercise 12.2: the LoRA layer")

    assert pick(check_lora_layer, Stub, reference=LoRALayer) is LoRALayer
    assert "not done yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Exercise 12.4: DreamBooth's prior-preservation loss
# ---------------------------------------------------------------------------------------------------------

def my_prior_preservation_loss(unet, scheduler, instance_latents, instance_context, class_latents, class_context,
                               generator, prior_weight):
    """A learner's version written another way: per-picture errors, then a mask of which are the instance's."""
    z0 = torch.cat([instance_latents, class_latents])
    context = torch.cat([instance_context, class_context])
    t = torch.randint(0, 1000, (len(z0),), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    per_picture = (unet(alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise, context, t) - noise).pow(2)
    per_picture = per_picture.flatten(1).mean(dim=1)                      # (B + C,)
    is_instance = torch.arange(len(z0)) < len(instance_latents)
    return per_picture[is_instance].mean() + prior_weight * per_picture[~is_instance].mean()


def test_check_prior_preservation_loss_passes_the_reference_and_a_learners_version(capsys):
    assert check_prior_preservation_loss(prior_preservation_loss)
    assert check_prior_preservation_loss(my_prior_preservation_loss)
    assert capsys.readouterr().out.count("✅ check_prior_preservation_loss passed") == 2


def _class_with_instance_prompt(unet, scheduler, zi, ci, zc, cc, generator, weight):
    return prior_preservation_loss(unet, scheduler, zi, ci, zc, ci[:1].expand(len(zc), -1, -1), generator, weight)


def _weight_squared(unet, scheduler, zi, ci, zc, cc, generator, weight):
    instance_only = prior_preservation_loss(unet, scheduler, zi, ci, zc, cc, generator, 0.0)
    generator_again = torch.Generator().manual_seed(generator.initial_seed())
    full = prior_preservation_loss(unet, scheduler, zi, ci, zc, cc, generator_again, 1.0)
    return instance_only + weight ** 2 * (full - instance_only)


def _unfreezes(unet, *args):
    unet.requires_grad_(True)
    return prior_preservation_loss(unet, *args)


def _returns_a_number(*args):
    return prior_preservation_loss(*args).item()


@pytest.mark.parametrize("fn, mistake", [
    (_wrong_prior("one_mean"), "the class batch is being trained as if it were the instance"),
    (_wrong_prior("weight_on_instance"), "with λ = 0 the loss still depends on the class pictures"),
    (_wrong_prior("no_weight"), "with λ = 0 the loss still depends on the class pictures"),
    (_wrong_prior("instance_only"), "λ changes nothing"),
    (_class_with_instance_prompt, "does not depend on the class prompt's text states"),
    (_weight_squared, "λ does not weight the prior term"),
    (_unfreezes, "the loss changed which weights train"),
    (_returns_a_number, "the loss as a one-number tensor"),
])
def test_check_prior_preservation_loss_rejects_what_its_behaviour_shows(fn, mistake):
    rejects(check_prior_preservation_loss, fn, "check_prior_preservation_loss failed", mistake)


@pytest.mark.parametrize("kind, mistake", [
    ("average", "the two terms are averaged"),
    ("halves", "split in two equal halves"),
    ("x0", "compared with the clean latents"),
    ("noise_first", "the noise is drawn before the timesteps"),
    ("class_first", "the class pictures come first in the batch"),
])
def test_check_prior_preservation_loss_names_the_mistake(kind, mistake):
    rejects(check_prior_preservation_loss, _wrong_prior(kind), "check_prior_preservation_loss failed", "Hint: ",
            mistake)


def test_check_prior_preservation_loss_rejects_an_unknown_mistake_without_code():
    def absolute_error(unet, scheduler, zi, ci, zc, cc, generator, weight):
        z0, context = torch.cat([zi, zc]), torch.cat([ci, cc])
        t = torch.randint(0, 1000, (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        error = (unet(scheduler.add_noise(z0, noise, t), context, t) - noise).abs()
        return error[:len(zi)].mean() + weight * error[len(zi):].mean()

    rejects_unrecognised(check_prior_preservation_loss, absolute_error, "12.4")
