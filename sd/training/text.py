"""Stage 2: the text encoder, trained the way CLIP was (Radford et al. 2021): contrastively against an image encoder.

The tokenizer's BPE merges are learned from the captions with the project's own BPE code; then the
project's `CLIP` text model (small) and a small CNN image encoder are trained so that a caption's embedding
is closest to the embeddings of the images it describes. Only the text model is kept: SD conditions on its
last hidden state, not on the pooled embedding.

A caption describes an image when every attribute it says (shape, color, background, and size and position
when it says them) is the image's: the objective must see all five, or the text states never learn them.
With only shape, color and background as labels, "top left" and "top right" were the same caption to the
loss: their end-token states differed by 0.3% and the UNet, which reads most of its cross-attention from
those states, drew left and right at random. The image tower sees where things are: it keeps the
feature map it projects whole (no global pooling, which would forget position).
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
from .data import NOT_SAID, ShapesDataset
from ..tokenizer import CLIPTokenizer, learn_bpe_merges
from .loop import TrainOptions, batch_indices, device_of, rank_and_world, read_stage, train_loop

# CLIP initialises its learnable temperature to 1/0.07 and clips the logit scale at 100 (Radford et al. 2021, 2.5).
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


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
    """Text model + image encoder + projections + temperature: everything the contrastive loss trains."""

    def __init__(self, clip_config: CLIPConfig, image_width: int, embed_dim: int, eos_id: int, image_size: int = 32):
        super().__init__()
        self.clip = CLIP(clip_config)
        self.image_encoder = ImageEncoder(image_width, embed_dim, image_size)
        self.text_projection = nn.Linear(clip_config.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.eos_id = eos_id

    def text_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled text feature: the hidden state at the (first) end token, projected (B, D)."""
        hidden = self.clip(tokens)                                              # (B, T, C)
        eos = (tokens == self.eos_id).int().argmax(dim=1)                      # (B,) first end token
        return self.text_projection(hidden[torch.arange(tokens.shape[0]), eos])

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(self.image_encoder(image), self.text_embedding(tokens), self.logit_scale, same)


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
    # only the tokens up to the longest caption's end (16 of 77), which makes each step about 5x cheaper.
    length = int((caption_tokens == tokenizer.eos_id).int().argmax(dim=1).max()) + 1
    caption_tokens = caption_tokens[:, :length]                                # (N_captions, 77) -> (N, length)
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in dataset.captions])       # (N,) row of each item's caption
    if opts.progress and rank_and_world()[0] == 0:
        print(f"tokenizer: {len(tokenizer)} tokens from {num_merges} merges learned on {len(captions)} captions")

    def step_loss(model, step, generator):
        idx = batch_indices(len(dataset), opts.batch_size, step, opts.seed, *rank_and_world())
        device = device_of(model)
        same = caption_describes(dataset.said[idx], dataset.labels[idx])      # (B, B): caption j fits image i
        return model(dataset.pixels(idx).to(device), caption_tokens[caption_index[idx]].to(device), same.to(device))

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
    from .data import POSITIONS, all_combinations, caption_for
    keys = [(*c, "large", "center") for c in all_combinations()]
    keys += [(*c, "small", p) for c in all_combinations() for p in POSITIONS]
    return [caption_for(*k[:4], k[4] if k[3] == "small" else None) for k in keys], keys


@torch.no_grad()
def retrieval_accuracy(pair: ContrastivePair, tokenizer: CLIPTokenizer, dataset: ShapesDataset,
                       n: int = 512, full: bool = False) -> float:
    """Fraction of images whose nearest short caption ('a red circle on a blue background', 90 of them) is
    the true one; full=True: the nearest of the 540 full captions ('a small red circle ... in the top left')."""
    from .data import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, all_combinations, caption_for
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
