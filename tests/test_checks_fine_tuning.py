"""The fine-tuning notebook's checks: the references are what sd.adapters and PEFT compute, mistakes are named.

The LoRA check's reference, sd.adapters.lora.LoRALayer, must give PEFT's LoRA Linear on the same weights; the
textual-inversion reference step must be sd.adapters.textual_inversion.textual_inversion_step (same losses, same
embedding table after two steps, on the shipped small model).
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
from sd.course.checks import check_lora_layer, check_textual_inversion_step, pick
from sd.course.checks.fine_tuning import reference_textual_inversion_step
from tests.check_helpers import rejects


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

    def forward(self, x):
        delta = self.lora_B.weight @ self.lora_A.weight                        # (out, in)
        return self.base(x) + self.scale * self.alpha / self.rank * (x @ delta.T)


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


def test_checks_pass_the_references_and_correct_learner_code_with_one_line_each(capsys):
    assert check_lora_layer(LoRALayer) and check_lora_layer(MyLoRALinear)
    assert check_textual_inversion_step(reference_textual_inversion_step)
    assert check_textual_inversion_step(textual_inversion_step)
    assert check_textual_inversion_step(my_textual_inversion_step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("✅ check_") and " passed: matches " in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Done wrong
# ---------------------------------------------------------------------------------------------------------

def lora_with(forward):
    return type("WrongLoRA", (MyLoRALinear,), {"forward": forward})


@pytest.mark.parametrize("forward, mistake", [
    (lambda s, x: s.base(x) + s.scale * s.lora_B(s.lora_A(x)), "not multiplied by alpha / rank"),
    (lambda s, x: s.base(x) + s.scale * s.rank / s.alpha * s.lora_B(s.lora_A(x)), "inverted (rank / alpha)"),
    (lambda s, x: s.base(x) + s.scale * s.alpha / s.rank * (x @ s.lora_B.weight @ s.lora_A.weight),
     "A and B are swapped"),
    (lambda s, x: s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x)), "frozen layer's own output W x is missing"),
    (lambda s, x: s.base(x) + s.scale * s.scale * s.alpha / s.rank * s.lora_B(s.lora_A(x)), "applied twice"),
    (lambda s, x: s.base(x) + s.alpha / s.rank * s.lora_B(s.lora_A(x)), "user's scale is missing"),
])
def test_check_lora_layer_names_the_mistake(forward, mistake):
    rejects(check_lora_layer, lora_with(forward), "check_lora_layer failed", "Hint: ", mistake)


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
        loss = F.mse_loss(pipe.unet(z_t, context, t), latents if kind == "x0" else noise)
        if kind != "no_zero_grad":
            optimizer.zero_grad()
        loss.backward()
        weight = pipe.clip.embedding.token_embedding.weight
        if kind != "all_rows":
            keep = torch.zeros(weight.shape[0], dtype=torch.bool)
            keep[token_ids] = True
            weight.grad[~keep] = 0
        optimizer.step()
        return loss.item()
    return step


@pytest.mark.parametrize("kind, mistake", [
    ("all_rows", "every row of the embedding table moved"),
    ("x0", "compares the UNet's output with the clean latent"),
    ("no_zero_grad", "gradient of the previous step is still there"),
    ("noise_first", "noise is drawn before the timestep"),
])
def test_check_textual_inversion_step_names_the_mistake(kind, mistake):
    rejects(check_textual_inversion_step, _ti_step(kind), "check_textual_inversion_step failed", "Hint: ", mistake)


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
