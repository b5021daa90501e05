"""Stage 2: the text encoder, trained the way CLIP was (Radford et al. 2021): contrastively against an image encoder,
plus a caption-reading loss.

The tokenizer's BPE merges are learned from the captions with the project's own BPE code; then the
project's `CLIP` text model (small) and a small CNN image encoder are trained so that a caption's embedding
is closest to the embeddings of the images it describes. Only the text model is kept: SD conditions on its
last hidden state, not on the pooled embedding.

A caption describes an image when every attribute it says (shape, color, background, and size and position
when it says them) is the image's. With only shape, color and background as labels, "top left" and "top right"
were the same caption to the loss; their end-token states differed by 0.3% (colors: 68%), and the UNet, which
puts 60-99% of its cross-attention on the end and padding states, drew left and right at random.
Within this CPU budget the contrastive loss teaches those states colors and sizes, but shapes and places
only slowly (its image tower must learn them first), so a second loss makes the end and padding states
name every attribute the caption says, through one linear head each: then "top left" and "top right" differ
by about 55% there. Batches are groups of images that share their colors (hard negatives), and the image
tower keeps its feature map whole (a global pool would forget where the shape is).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import CLIP
from ..config import CLIPConfig
from .data import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, NOT_SAID, POSITIONS, ShapesDataset, all_combinations, caption_for
from ..tokenizer import CLIPTokenizer, learn_bpe_merges
from .loop import SEED_STRIDE, TrainOptions, device_of, rank_and_world, read_stage, train_loop

# CLIP initialises its learnable temperature to 1/0.07 and clips the logit scale at 100 (Radford et al. 2021, 2.5).
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0
# Hard negatives: a batch is made of groups of images that share their colors, so the loss can only tell them
# apart by shape, size and position. In a random batch of 128 almost every pair already differs in color, the
# loss falls on colors alone, and shape and position stayed at chance after 390 steps.
GROUP_SIZE = 8
# Weight of the caption-reading loss next to the contrastive one (see ContrastivePair.attribute_loss).
ATTRIBUTE_LOSS_WEIGHT = 1.0
TRAINED_PADDING = 8             # padding states after the longest caption that the caption-reading loss sees


class ImageEncoder(nn.Module):
    """CLIP's image tower in miniature: three stride-2 convolutions, then a projection of the whole feature map.

    Not a global average pool: pooling forgets where things are, and position is part of what a caption says.
    Projecting the flattened map keeps it, as CLIP's ViT keeps it through its position embeddings.
    """

    def __init__(self, width: int, embed_dim: int, image_size: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),              # (B, 3, H, W) -> (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),      # -> (B, 2w, H/4, W/4)
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),  # -> (B, 4w, H/8, W/8)
        )
        cells = math.ceil(image_size / 8) ** 2
        self.proj = nn.Linear(4 * width * cells, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(image).flatten(1))                          # (B, 4w * H/8 * W/8) -> (B, D)


class ContrastivePair(nn.Module):
    """Text model + image encoder + projections + temperature: everything the contrastive loss trains;
    plus one linear head per attribute that reads the caption's end-token state (the caption-reading loss)."""

    def __init__(self, clip_config: CLIPConfig, image_width: int, embed_dim: int, eos_id: int, image_size: int = 32):
        super().__init__()
        self.clip = CLIP(clip_config)
        self.image_encoder = ImageEncoder(image_width, embed_dim, image_size)
        self.text_projection = nn.Linear(clip_config.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.attribute_heads = nn.ModuleDict({name: nn.Linear(clip_config.width, len(ATTRIBUTE_VALUES[name]))
                                              for name in ATTRIBUTE_NAMES})
        self.eos_id = eos_id

    def _end_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states (B, T, C) and the index of each caption's (first) end token (B,)."""
        hidden = self.clip(tokens)                                              # (B, T, C)
        return hidden, (tokens == self.eos_id).int().argmax(dim=1)             # (B,) first end token

    def text_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled text feature: the hidden state at the (first) end token, projected (B, D)."""
        hidden, eos = self._end_states(tokens)
        return self.text_projection(hidden[torch.arange(tokens.shape[0]), eos])

    def attribute_loss(self, hidden: torch.Tensor, eos: torch.Tensor, said: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each attribute the caption says, read by a linear head from the end token's state
        and every padding state after it (NOT_SAID attributes are skipped): the states SD's UNet reads most."""
        after = torch.arange(hidden.shape[1], device=hidden.device)[None, :] >= eos[:, None]   # (B, T)
        states = hidden[after]                                                  # (n, C): end and padding states
        rows = said.to(hidden.device)[after.nonzero()[:, 0]]                   # (n, 5): each state's caption
        return sum(F.cross_entropy(self.attribute_heads[name](states), rows[:, k], ignore_index=NOT_SAID)
                   for k, name in enumerate(ATTRIBUTE_NAMES) if (rows[:, k] != NOT_SAID).any())

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, same: torch.Tensor,
                said: torch.Tensor | None = None) -> torch.Tensor:
        hidden, eos = self._end_states(tokens)
        text = self.text_projection(hidden[torch.arange(tokens.shape[0]), eos])
        loss = contrastive_loss(self.image_encoder(image), text, self.logit_scale, same)
        if said is not None:
            loss = loss + ATTRIBUTE_LOSS_WEIGHT * self.attribute_loss(hidden, eos, said)
        return loss


def contrastive_loss(image_emb, text_emb, logit_scale, same: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over cosine similarities (Radford et al. 2021, fig. 3).

    same[i, j] marks pairs that match (caption j describes image i; the diagonal always does): with few
    distinct captions a batch holds duplicates, which plain CLIP would push apart; here each image's target
    spreads evenly over all captions that describe it, and each caption's over all images it describes.
    """
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image_emb @ text_emb.T    # (B, D) x (D, B) -> (B, B)
    target_i = same.float() / same.float().sum(dim=1, keepdim=True)                   # rows: images
    target_t = same.T.float() / same.T.float().sum(dim=1, keepdim=True)               # rows: captions
    loss_i = torch.sum(-target_i * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-target_t * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


def caption_describes(said: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 5) caption labels (NOT_SAID where left out) and (B, 5) image labels -> (B_images, B_captions) bool:
    True where every attribute caption j says is image i's."""
    agree = (said[None, :, :] == labels[:, None, :]) | (said[None, :, :] == NOT_SAID)   # (B, B, 5)
    return agree.all(-1)


def color_groups(dataset: ShapesDataset) -> list[torch.Tensor]:
    """Indices of the dataset's images, one tensor per (color, background) pair that occurs."""
    keys = dataset.labels[:, 1] * 100 + dataset.labels[:, 2]                # (N,) one number per color pair
    return [torch.nonzero(keys == k).flatten() for k in keys.unique()]


def grouped_batch(groups: list[torch.Tensor], global_batch: int, step: int, seed: int,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of a batch of global_batch // GROUP_SIZE color groups, GROUP_SIZE images each
    (a pure function of the step, the same on every rank, as batch_indices)."""
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} must be divisible by the number of processes {world}")
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
    picks = torch.randint(len(groups), (max(1, global_batch // GROUP_SIZE),), generator=g).tolist()
    idx = torch.cat([groups[p][torch.randint(len(groups[p]), (GROUP_SIZE,), generator=g)] for p in picks])
    return idx[:global_batch][rank::world]


def learn_tokenizer(captions: list[str], num_merges: int) -> CLIPTokenizer:
    """A CLIP-style tokenizer whose merges are learned from the captions (most caption words become one token)."""
    return CLIPTokenizer.from_merges(learn_bpe_merges(sorted(set(captions)), num_merges))


def train_text_encoder(dataset: ShapesDataset, clip_config: CLIPConfig, image_width: int, embed_dim: int,
                       num_merges: int, opts: TrainOptions) -> dict:
    """Learn the tokenizer, then train CLIP contrastively; writes <out>/text.safetensors and <out>/tokenizer/."""
    tokenizer = learn_tokenizer(dataset.captions, num_merges)
    clip_config = dataclasses.replace(clip_config, vocab_size=len(tokenizer))
    pair = ContrastivePair(clip_config, image_width, embed_dim, tokenizer.eos_id, dataset.image_size)
    captions = sorted(set(dataset.captions))
    caption_tokens = tokenizer(captions)                                       # (N_captions, 77)
    # The text model is causal, so the end token's state never sees the padding after it: the loss needs
    # only the tokens up to the longest caption's end (16 of 77), and the caption-reading loss a few padding
    # states after it: 24 of 77 tokens, which makes each step about 3x cheaper.
    length = int((caption_tokens == tokenizer.eos_id).int().argmax(dim=1).max()) + 1 + TRAINED_PADDING
    caption_tokens = caption_tokens[:, :length]                                # (N_captions, 77) -> (N, length)
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in dataset.captions])       # (N,) row of each item's caption
    if opts.progress and rank_and_world()[0] == 0:
        print(f"tokenizer: {len(tokenizer)} tokens from {num_merges} merges learned on {len(captions)} captions")

    groups = color_groups(dataset)

    def step_loss(model, step, generator):
        idx = grouped_batch(groups, opts.batch_size, step, opts.seed, *rank_and_world())
        device = device_of(model)
        same = caption_describes(dataset.said[idx], dataset.labels[idx])      # (B, B): caption j fits image i
        return model(dataset.pixels(idx).to(device), caption_tokens[caption_index[idx]].to(device), same.to(device),
                     dataset.said[idx])

    Path(opts.out_dir).mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] == 0:
        tokenizer.save(Path(opts.out_dir) / "tokenizer")
    meta = {"clip": dataclasses.asdict(clip_config), "image_encoder_width": image_width, "embed_dim": embed_dim}
    measured = {}

    def finish(model) -> dict:
        measured["retrieval_accuracy"] = retrieval_accuracy(model, tokenizer, dataset)
        measured["full_caption_retrieval_accuracy"] = retrieval_accuracy(model, tokenizer, dataset, full=True)
        return measured

    run = train_loop("text", pair, step_loss, opts, meta, weight_decay=0.01, finish=finish)
    run["tokenizer"] = tokenizer
    run.update(measured)
    return run


def full_captions() -> tuple[list[str], list[tuple[str, ...]]]:
    """Every caption that says all five attributes, with its (shape, color, background, size, position):
    a large shape in the centre (its caption names no place) or a small one in any of the five places."""
    keys = [(*c, "large", "center") for c in all_combinations()]
    keys += [(*c, "small", p) for c in all_combinations() for p in POSITIONS]
    return [caption_for(*k[:4], k[4] if k[3] == "small" else None) for k in keys], keys


@torch.no_grad()
def retrieval_accuracy(pair: ContrastivePair, tokenizer: CLIPTokenizer, dataset: ShapesDataset,
                       n: int = 512, full: bool = False) -> float:
    """Fraction of images whose nearest short caption ('a red circle on a blue background', 90 of them) is
    the true one; full=True: the nearest of the 540 full captions ('a small red circle ... in the top left')."""
    if full:
        captions, keys = full_captions()
        width = len(ATTRIBUTE_NAMES)
    else:
        keys = all_combinations()
        captions, width = [caption_for(*k) for k in keys], 3
    device = device_of(pair)
    text = F.normalize(pair.text_embedding(tokenizer(captions).to(device)), dim=-1)
    image = F.normalize(pair.image_encoder(dataset.pixels(slice(0, n)).to(device)), dim=-1)
    best = (image @ text.T).argmax(dim=1).cpu()                               # (n,) index into keys
    truth = torch.tensor([keys.index(tuple(ATTRIBUTE_VALUES[name][i] for name, i in zip(ATTRIBUTE_NAMES, row)))
                          for row in dataset.labels[:n, :width].tolist()])
    return (best == truth).float().mean().item()


def load_text_encoder(path, tokenizer_dir=None) -> tuple[CLIP, CLIPTokenizer]:
    """The CLIP text model of a text stage checkpoint, and its tokenizer (default: `tokenizer/` beside it)."""
    parts, meta = read_stage(path)
    clip = CLIP(CLIPConfig.from_dict(meta["clip"]))
    clip.load_state_dict({k[len("clip."):]: v for k, v in parts["model"].items() if k.startswith("clip.")})
    tokenizer = CLIPTokenizer(tokenizer_dir or Path(path).parent / "tokenizer")
    return clip.eval(), tokenizer
