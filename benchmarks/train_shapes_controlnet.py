"""Train the shipped ControlNet for the shipped small model (sd/assets/shapes_controlnet.safetensors).

    OMP_NUM_THREADS=1 python benchmarks/train_shapes_controlnet.py [--steps 1600] [--out runs/shapes_controlnet]
        [--resume] [--ship]

Trains with sd.training.controlnet.train_controlnet on 20,000 training-split shapes (seed 0), the control being
each shape's mask; every 250 steps a resumable checkpoint <out>/controlnet.safetensors. --ship writes the final
ControlNet in float16 to sd/assets/shapes_controlnet.safetensors (what `pipe.load_controlnet` reads).
"""
from __future__ import annotations

import argparse

import sd
from sd.training.controlnet import SHIPPED_CONTROLNET, export_controlnet, train_controlnet
from sd.training.loop import TrainOptions
from sd.training.stages import make_dataset

STEPS = 1600                   # the shipped run's step budget (ends in time on a shared 2-core machine)
DATASET_SIZE = 20_000          # as `python -m sd train` (stages.DEFAULT_DATASET_SIZE)
CHECKPOINT_EVERY = 250


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default="runs/shapes_controlnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ship", action="store_true", help=f"write the result in float16 to {SHIPPED_CONTROLNET}")
    args = parser.parse_args(argv)
    pipe = sd.load_checkpoint(device="cpu")
    dataset = make_dataset(pipe.native_size, DATASET_SIZE, seed=args.seed, progress=True)
    opts = TrainOptions(out_dir=args.out, steps=args.steps, seed=args.seed, resume=args.resume,
                        checkpoint_every=CHECKPOINT_EVERY, device="cpu")
    run = train_controlnet(pipe, dataset, opts)
    print(f"{run['steps']} steps in {run['seconds']:.0f} s; loss of the last 100 steps "
          f"{sum(run['losses'][-100:]) / len(run['losses'][-100:]):.4f}; wrote {run['path']}")
    if args.ship:
        print(f"shipped {export_controlnet(run['model'], SHIPPED_CONTROLNET)} (float16)")


if __name__ == "__main__":
    main()
