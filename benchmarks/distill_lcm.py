"""Distil the shipped model into the LCM-LoRA that ships in sd/assets/ (until `python -m sd` has a command for it).

    OMP_NUM_THREADS=1 python -m benchmarks.distill_lcm --steps 1200 --out runs/lcm           # the shipped run
    python -m benchmarks.distill_lcm --steps 1200 --out runs/lcm --resume                      # after Ctrl-C
    python -m benchmarks.distill_lcm --steps 20 --out /tmp/lcm --no-ship                       # a quick look

Runs sd.training.consistency.distill_lcm on the shipped model (teacher = its UNet, unchanged) and copies
<out>/lcm_lora.safetensors (float16) to sd/assets/lcm_lora.safetensors unless --no-ship.
"""
from __future__ import annotations

import argparse
import shutil

import sd
from sd.training.consistency import LCM_BATCH, LCM_DATASET_SIZE, LCM_LORA_FILE, LCM_LORA_RANK, LCM_LR, distill_lcm
from sd.training.loop import TrainOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--minutes", type=float, default=None, help="also stop after this many minutes")
    parser.add_argument("--out", default="runs/lcm")
    parser.add_argument("--rank", type=int, default=LCM_LORA_RANK)
    parser.add_argument("--lr", type=float, default=LCM_LR)
    parser.add_argument("--batch-size", type=int, default=LCM_BATCH)
    parser.add_argument("--dataset-size", type=int, default=LCM_DATASET_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-ship", action="store_true", help="do not copy the LoRA into sd/assets/")
    args = parser.parse_args()
    opts = TrainOptions(out_dir=args.out, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every)
    run = distill_lcm(sd.load_checkpoint(), opts, rank=args.rank, dataset_size=args.dataset_size)
    print(f"{run['steps']} steps in {run['seconds'] / 60:.1f} min; last loss {run['losses'][-1]:.5f}; "
          f"LoRA {run['lora_path']}")
    if not args.no_ship:
        shutil.copyfile(run["lora_path"], LCM_LORA_FILE)
        print(f"shipped as {LCM_LORA_FILE}")


if __name__ == "__main__":
    main()
