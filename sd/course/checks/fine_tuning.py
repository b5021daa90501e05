"""Checks for the fine-tuning notebook: the LoRA layer's forward, and one step of textual inversion.

The LoRA reference is `sd.adapters.lora.LoRALayer` itself (tests/test_checks_fine_tuning.py proves it equals
PEFT's); the textual-inversion reference step is written out here, after Gal et al. 2022, sec. 4 (SD's
noise-prediction loss, the gradient kept only on the new word's row), and the tests prove that it is
`sd.adapters.textual_inversion.textual_inversion_step`. The textual-inversion check runs the learner's step twice
on a small random pipeline and compares the losses and the whole embedding table afterwards with the reference's;
the `Mistake`s rerun the steps the typical wrong ways (every row updated, the clean latent as target, ...).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters.lora import LoRALayer
from ...adapters.textual_inversion import add_token_rows, textual_inversion_optimizer
from ...clip import CLIP
from ...config import CLIPConfig, UNetConfig, VAEConfig
from ...decoder import VAE_Decoder
from ...encoder import VAE_Encoder
from ...io.checkpoint import DEFAULT_MODEL
from ...pipeline import StableDiffusion
from ...tokenizer import CLIPTokenizer
from ...unet import DiffusionUNET
from .common import Case, Mistake, check_function, check_module, randn, seeded

# ----------------------------------------------------------------------------------------------------------
# Exercise: the LoRA layer's forward
# ----------------------------------------------------------------------------------------------------------

# (in, out, rank, alpha, scale): the right factor scale * alpha / r and the wrong ones (scale, scale * r / alpha,
# scale^2 * alpha / r, alpha / r) all differ, so each mistake has an output of its own; the first layer is square,
# so that A and B swapped still runs there.
_LORA_SHAPES = ((16, 16, 4, 12.0, 0.5), (24, 12, 2, 1.0, 1.5), (12, 20, 8, 16.0, 0.75))


def _lora_cases() -> list[Case]:
    cases = []
    with seeded(100):
        for j, (d_in, d_out, rank, alpha, scale) in enumerate(_LORA_SHAPES):
            base = nn.Linear(d_in, d_out)
            cases.append(Case({"x": randn(2, 5, d_in) if j != 1 else randn(3, d_in)},
                              init={"base": base, "rank": rank, "alpha": alpha, "scale": scale}))
    return cases


def check_lora_layer(cls) -> bool:
    """cls(base, rank, alpha, scale) with base, lora_A, lora_B: forward = W x + scale * (alpha / rank) * B(A x)."""
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
        Mistake("the update is not multiplied by alpha / rank: scale * (alpha / rank) * B(A x) keeps its size the "
                "same whatever the rank", wrong("no_ratio")),
        Mistake("alpha / rank is inverted (rank / alpha): the update is scale * (alpha / rank) * B(A x)",
                wrong("inverted")),
        Mistake("A and B are swapped: A (rank x in) comes first and squeezes x to rank numbers, B (out x rank) "
                "spreads them back, B(A x)", wrong("swapped")),
        Mistake("the frozen layer's own output W x is missing: LoRA adds its update to base(x)", wrong("no_base")),
        Mistake("the scale is applied twice: multiply the update by scale once", wrong("scale_twice")),
        Mistake("the user's scale is missing: the update is scale * (alpha / rank) * B(A x)", wrong("no_scale")),
        Mistake("this is the frozen layer alone: add the update scale * (alpha / rank) * B(A x)", wrong("base_only")),
    ]
    return check_module("check_lora_layer", cls, LoRALayer, _lora_cases(), mistakes,
                        hint="return self.base(x) + self.scale * (self.alpha / self.rank) * "
                             "self.lora_B(self.lora_A(x))",
                        reference_name="sd.adapters.lora.LoRALayer")


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


# A small random pipeline for the check: the shipped model's tokenizer, a one-layer CLIP, a two-level UNet.
_CHECK_WORD = "<new-word>"
_CHECK_LR = 1e-2
_CHECK_STEPS = 2            # two steps: a gradient left over from the first (no zero_grad) shows in the second
_CHECK_PROMPTS = ("a red <new-word> on a blue background", "a <new-word>")


def _small_pipeline(seed: int) -> tuple[StableDiffusion, list[int]]:
    """A random small pipeline that knows the word _CHECK_WORD (one new row), and the new row's ids."""
    tokenizer = CLIPTokenizer(DEFAULT_MODEL.parent / "default_model_tokenizer")
    with seeded(seed):
        clip = CLIP(CLIPConfig(vocab_size=len(tokenizer), width=32, layers=1, heads=2, mlp_width=64))
        unet = DiffusionUNET(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                        heads=2, context_dim=32, norm_groups=8, sample_size=4))
        vae = VAEConfig(block_channels=(8, 8), layers_per_block=1, norm_groups=4)
        pipe = StableDiffusion(clip.eval(), VAE_Encoder(vae).eval(), VAE_Decoder(vae).eval(), unet.eval(), tokenizer)
        ids = tokenizer.add_token(_CHECK_WORD)
        add_token_rows(clip, ids, 0.1 * randn(1, 32))
    return pipe, ids


def _runner(step):
    """A function of a case that trains a fresh small pipeline with `step` and returns (losses, embedding table)."""
    def run(seed: int):
        pipe, ids = _small_pipeline(seed)
        with seeded(seed + 1):
            latents = randn(len(_CHECK_PROMPTS), 4, 4, 4)
        optimizer = textual_inversion_optimizer(pipe, lr=_CHECK_LR)
        generator = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            losses = [step(pipe, latents.clone(), list(_CHECK_PROMPTS), list(ids), optimizer, generator)
                      for _ in range(_CHECK_STEPS)]
        if not all(isinstance(v, (float, int, torch.Tensor)) for v in losses):
            raise AssertionError(f"the step should return the loss as a number (loss.item()), got {losses[0]!r}")
        losses = torch.tensor([float(v) for v in losses])             # (steps,)
        return losses, pipe.clip.embedding.token_embedding.weight.detach().clone()
    run.__name__ = run.__qualname__ = getattr(step, "__name__", "step")
    run.__module__ = getattr(step, "__module__", "?")
    return run


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
        others[token_ids] = False
        if kind != "all_rows":
            weight.grad[others] = 0
        optimizer.step()
        return loss.item()
    return step


def check_textual_inversion_step(fn) -> bool:
    """fn(pipe, latents, prompts, token_ids, optimizer, generator) -> loss: one step that moves only the new rows."""
    cases = [Case({"seed": seed}) for seed in (0, 1)]

    def wrong(kind):
        return lambda ref, case: _runner(_wrong_step(kind))(case.inputs["seed"])

    mistakes = [
        Mistake("every row of the embedding table moved: zero the gradient of all rows but token_ids after "
                "loss.backward() and before optimizer.step(), so that only the new word is learned",
                wrong("all_rows")),
        Mistake("the loss compares the UNet's output with the clean latent: SD's UNet predicts the noise, "
                "mse(unet(z_t, context, t), noise)", wrong("x0")),
        Mistake("the gradient of the previous step is still there: call optimizer.zero_grad() before "
                "loss.backward()", wrong("no_zero_grad")),
        Mistake("the noise is drawn before the timestep: draw t first, then the noise, from the generator (the "
                "check compares with the reference drawn in that order)", wrong("noise_first")),
    ]
    return check_function("check_textual_inversion_step", _runner(fn),
                          _runner(reference_textual_inversion_step), cases, mistakes,
                          hint="context = pipe.clip(pipe.tokenizer(prompts)); the loss of exercise 10.1 on "
                               "(latents, context); zero_grad, backward, zero the gradient of the other rows, step",
                          reference_name="sd.adapters.textual_inversion.textual_inversion_step "
                                         "(reference_textual_inversion_step)")
