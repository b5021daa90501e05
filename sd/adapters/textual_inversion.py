"""Textual inversion (Gal et al. 2022): a new word whose embedding was learned, the rest of the model untouched.

The word gets new token ids in the tokenizer and new rows in CLIP's token-embedding table; the learned vectors
are those rows. A file may hold several vectors for one word: `<t>` then stands for `<t> <t>_1 <t>_2 ...`.

Files people download (the ones diffusers' `load_textual_inversion` reads):
- diffusers: `learned_embeds.bin` / `.safetensors` = {"<token>": tensor (D,) or (n, D)};
- A1111 `.pt`: {"string_to_param": {"*": tensor (n, D)}, "name": ..., ...} (read with weights_only: no code runs);
- A1111 `.safetensors`: {"emb_params": tensor (n, D)}, the word being the file's name.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..io.safe_read import read_tensors
from ..diffusion import diffusion_loss

# Keys of the A1111 layouts.
A1111_PARAMS, A1111_ANY_STRING, A1111_NAME = "string_to_param", "*", "name"
A1111_SAFETENSORS_KEY = "emb_params"


def read_embedding_file(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """A textual-inversion file -> (its word, vectors (n, D)); `token` renames the word."""
    path = Path(path)
    state, _ = read_tensors(path)     # .pt/.bin read with weights_only=True: tensors, strings and ints only
    if A1111_PARAMS in state:
        params = state[A1111_PARAMS]
        if not isinstance(params, dict) or A1111_ANY_STRING not in params:
            raise ValueError(f"{path.name}: '{A1111_PARAMS}' should map '{A1111_ANY_STRING}' to the vectors")
        name, vectors = state.get(A1111_NAME) or path.stem, params[A1111_ANY_STRING]
    elif len(state) == 1:
        name, vectors = next(iter(state.items()))
        if name == A1111_SAFETENSORS_KEY:
            name = path.stem
    else:
        raise ValueError(f"{path.name}: expected one word's vectors ({{'<token>': tensor}}, A1111's "
                         f"'{A1111_PARAMS}' or '{A1111_SAFETENSORS_KEY}'), got keys {sorted(state)[:5]} "
                         f"(an SDXL embedding holds clip_l and clip_g)")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise ValueError(f"{path.name}: the vectors should be a (D,) or (n, D) tensor, "
                         f"got {getattr(vectors, 'shape', type(vectors).__name__)}")
    return token or str(name), vectors.reshape(-1, vectors.shape[-1]).detach()   # (D,) -> (1, D)


def add_token_rows(clip: nn.Module, ids: list[int], vectors: torch.Tensor) -> None:
    """Write `vectors` (n, D) into CLIP's token-embedding rows `ids`, growing the table (and the config) if needed."""
    old = clip.embedding.token_embedding
    rows = max(old.num_embeddings, max(ids) + 1)
    if rows > old.num_embeddings:
        new = nn.Embedding(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight    # (V, D) -> (V + n, D), the old rows unchanged
        new.weight.requires_grad_(old.weight.requires_grad)
        clip.embedding.token_embedding = new
        clip.config = dataclasses.replace(clip.config, vocab_size=rows)
    with torch.no_grad():
        clip.embedding.token_embedding.weight[ids] = vectors.to(old.weight)


def load_textual_inversion(pipe, path: str | Path, token: str | None = None) -> list[str]:
    """Teach the pipeline the word of a textual-inversion file; returns the tokens added (`<t>`, `<t>_1`, ...)."""
    word, vectors = read_embedding_file(path, token)
    width = pipe.clip.config.width
    if vectors.shape[-1] != width:
        raise ValueError(f"{Path(path).name}: the vectors of {word!r} are {vectors.shape[-1]} wide, this text encoder "
                         f"is {width} wide (SD v1: 768, SD 2: 1024); an embedding for another model?")
    ids = pipe.tokenizer.add_token(word, num_vectors=vectors.shape[0])
    add_token_rows(pipe.clip, ids, vectors)
    return [pipe.tokenizer.id_to_token[i] for i in ids]


def textual_inversion_optimizer(pipe, lr: float = 5e-4) -> torch.optim.Optimizer:
    """Freeze everything but CLIP's token-embedding table; Adam on it (no weight decay, so untouched rows stay put)."""
    for model in (pipe.clip, pipe.unet):
        model.requires_grad_(False)
    weight = pipe.clip.embedding.token_embedding.weight
    weight.requires_grad_(True)
    return torch.optim.Adam([weight], lr=lr)


def textual_inversion_step(pipe, latents: torch.Tensor, prompts: list[str], token_ids: list[int],
                           optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
    """One step of learning the rows `token_ids`: SD's noise-prediction loss on (latents, prompts); returns it."""
    tokens = pipe.tokenizer(prompts).to(latents.device)         # (B, 77), the prompts use the new word
    context = pipe.clip(tokens)                                 # (B, 77, D), differentiable in the embedding table
    loss = diffusion_loss(pipe.unet, pipe.scheduler, latents, context, generator)
    optimizer.zero_grad()
    loss.backward()
    weight = pipe.clip.embedding.token_embedding.weight
    others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    others[token_ids] = False
    weight.grad[others] = 0           # the gradient reaches only the new word's rows
    optimizer.step()
    return loss.item()
