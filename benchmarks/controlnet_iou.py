"""Does the shipped ControlNet put the shape where its mask says? IoU with and without control, same seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.controlnet_iou [--items 48] [--seeds 0 1 2] [--controlnet PATH]

Pictures: `--items` fresh drawings of the training combinations (ShapesDataset, split "train", seed 1234: the
shipped ControlNet trained on seed 0's drawings), each with its mask (`sd.training.controlnet.shape_masks`,
threshold 0.5). For every drawing and seed, the shipped small model generates from its prompt twice from the same
noise: with the drawing's mask as control image (the shipped ControlNet at scale 1) and without control. DDIM,
20 steps, guidance 7.5. Two kinds of prompt: the full description (shape, colour, background, size, and the
position of a small shape), and the short one (shape, colour, background), where size and place are left to chance
without control.

Which pixels the model drew as the shape (`sd.training.controlnet.drawn_shape`): the shapes are flat colours on a
flat background, so a generated pixel belongs to the shape when its RGB value is nearer (Euclidean distance) the
prompt's shape colour than the prompt's background colour (colours from sd.training.data.PALETTE). IoU = |drawn and
mask| / |drawn or mask| per picture. Reported: the mean over drawings for each seed, the mean and standard deviation
of those seed means, and the share of (drawing, seed) pairs where control scores higher than no control.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sd
from sd.io.controlnet import load_controlnet
from sd.training.controlnet import IOU_GUIDANCE, IOU_STEPS, SHIPPED_CONTROLNET, iou_with_and_without
from sd.training.data import ShapesDataset

RESULTS = Path(__file__).resolve().parent / "results" / "controlnet_iou_cpu.txt"
EVAL_SEED = 1234               # the drawings' seed (the training used seed 0's)


def table(results: dict[str, torch.Tensor], seeds: list[int], title: str) -> list[str]:
    """Per-seed means, their mean and spread, and the paired win share."""
    lines = [title, f"  {'':10s} " + " ".join(f"seed {s:<4d}" for s in seeds) + "   mean +- std over seeds"]
    for name in ("none", "control"):
        per_seed = results[name].mean(1)                                   # (S,)
        lines.append(f"  {name:10s} " + " ".join(f"{v:9.3f}" for v in per_seed.tolist())
                     + f"   {per_seed.mean():.3f} +- {per_seed.std(unbiased=len(seeds) > 1):.3f}")
    wins = (results["control"] > results["none"]).float().mean()
    ties = (results["control"] == results["none"]).float().mean()
    lines.append(f"  control > none in {wins:.0%} of (drawing, seed) pairs, equal in {ties:.0%}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.controlnet_iou", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controlnet", default=str(SHIPPED_CONTROLNET))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.time()
    pipe = sd.load_checkpoint(device="cpu")
    net = load_controlnet(args.controlnet, dtype=torch.float32)
    drawings = ShapesDataset(args.items, image_size=pipe.native_size, seed=EVAL_SEED, split="train")
    lines = [f"ControlNet IoU on the shipped small model: {args.items} drawings (seed {EVAL_SEED}), seeds "
             f"{args.seeds}, DDIM {IOU_STEPS} steps, guidance {IOU_GUIDANCE}, ControlNet {Path(args.controlnet).name}",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)", ""]
    for short in (False, True):
        results = iou_with_and_without(pipe, net, drawings, args.seeds, short_prompts=short)
        kind = "short prompts (shape, colour, background)" if short else "full prompts (with size and position)"
        lines += table(results, args.seeds, kind)
        large = torch.tensor([a.size == "large" for a in drawings.attributes])
        for name, rows in (("large shapes", large), ("small shapes", ~large)):
            lines.append(f"  {name} ({int(rows.sum())}): none {results['none'][:, rows].mean():.3f}, "
                         f"control {results['control'][:, rows].mean():.3f}")
        lines.append("")
    lines.append(f"{time.time() - start:.0f} s in all")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
