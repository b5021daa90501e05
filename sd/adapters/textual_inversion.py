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

from ..diffusion import diffusion_loss
from ..io.safe_read import read_tensors
from ..tokenizer import clean_text
from ..validation import require_file

# Keys of the A1111 layouts.
A1111_PARAMS, A1111_ANY_STRING, A1111_NAME = "string_to_param", "*", "name"
A1111_SAFETENSORS_KEY = "emb_params"


def read_embedding_file(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """A textual-inversion file -> (its word, vectors (n, D)); `token` renames the word.

    The vectors must be finite floating-point numbers: a NaN row would turn every prompt with the word into NaN.
    """
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a string (the new word, e.g. '<my-shape>') or None, got "
                        f"{type(token).__name__} {token!r}")
    path = require_file(path, "path", "textual-inversion file")
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
    word = str(name) if token is None else token
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise ValueError(f"{path.name}: the vectors should be a (D,) or (n, D) tensor, "
                         f"got {getattr(vectors, 'shape', type(vectors).__name__)}")
    if not vectors.is_floating_point():
        raise ValueError(f"{path.name}: the vectors of {word!r} must be floating-point numbers, got {vectors.dtype}")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{path.name}: the vectors of {word!r} hold NaN or infinite values; refused before "
                         f"changing the model (every prompt with the word would turn into NaN)")
    return word, vectors.reshape(-1, vectors.shape[-1]).detach()   # (D,) -> (1, D)


def require_new_word(tokenizer, word: str, num_vectors: int = 1) -> list[str]:
    """The tokens a new word takes (`word`, `word_1`, ...), each checked to shadow nothing the tokenizer reads.

    The tokenizer stores a word as it reads it, lowercased and with its end marked ("Red" -> "red</w>"), so a
    check of the literal string would miss it. Each name is refused if the tokenizer already reads it as one
    vocabulary entry (an existing word: every prompt with that word would change), or as an added token (an
    earlier textual inversion), or if it holds a space (the tokenizer would match it across two words).
    """
    if not word.strip():
        raise ValueError(f"token must be a word such as '<my-shape>', got {word!r}")
    if any(c.isspace() for c in word):
        raise ValueError(f"token must be one word without spaces (e.g. '<my-shape>'), got {word!r}; a file's own "
                         f"name can be replaced with token=...")
    names = [word] + [f"{word}_{i}" for i in range(1, num_vectors)]
    added_ids = {i for ids in tokenizer.added_tokens.values() for i in ids}
    for name in names:
        ids = tokenizer.encode(name)[1:-1]                 # without the start and end tokens
        if not ids:
            raise ValueError(f"token {name!r} reads as no token at all (the tokenizer drops its characters)")
        if clean_text(name) in tokenizer.added_tokens or all(i in added_ids for i in ids):
            raise ValueError(f"token {name!r} is already taken by an earlier textual inversion (it reads as "
                             f"{[tokenizer.id_to_token[i] for i in ids]}); pass another name with token=...")
        if name in tokenizer.vocab:
            raise ValueError(f"token {name!r} is already a vocabulary entry; pass another name with token=...")
        if len(ids) == 1:
            entry = tokenizer.id_to_token[ids[0]]
            spelled = tokenizer.decode(ids)
            raise ValueError(f"token {name!r} would shadow the existing word {spelled!r} (the tokenizer reads it as "
                             f"the vocabulary entry {entry!r}) and change every prompt that uses it; pick a name "
                             f"no word spells, e.g. '<{spelled}>'")
    return names


def add_token_rows(clip: nn.Module, ids: list[int], vectors: torch.Tensor) -> None:
    """Write `vectors` (n, D) into CLIP's token-embedding rows `ids`, growing the table (and the config) if needed."""
    old = clip.embedding.token_embedding
    if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != (len(ids), old.embedding_dim):
        raise ValueError(f"vectors must be a tensor of shape ({len(ids)}, {old.embedding_dim}) (one row per new id), "
                         f"got {tuple(getattr(vectors, 'shape', ())) or type(vectors).__name__}")
    if not torch.isfinite(vectors).all():
        raise ValueError("vectors hold NaN or infinite values; the embedding table is left unchanged")
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
    """Teach the pipeline the word of a textual-inversion file; returns the tokens added (`<t>`, `<t>_1`, ...).

    The file, the vectors and the word are all checked before the tokenizer or the text encoder changes: a refused
    load leaves the vocabulary and the embedding table as they were.
    """
    word, vectors = read_embedding_file(path, token)                     # 1. check everything
    width = pipe.clip.config.width
    if vectors.shape[-1] != width:
        raise ValueError(f"{Path(path).name}: the vectors of {word!r} are {vectors.shape[-1]} wide, this text encoder "
                         f"is {width} wide (SD v1: 768, SD 2: 1024); an embedding for another model?")
    require_new_word(pipe.tokenizer, word, vectors.shape[0])
    ids = pipe.tokenizer.add_token(word, num_vectors=vectors.shape[0])  # 2. then apply
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
