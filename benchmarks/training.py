"""Training time and accuracy of each stage on the shapes dataset, within a time budget (not a test).

    python -m benchmarks.training                      # the budget goal: 30 minutes of training in all
    python -m benchmarks.training --minutes 5          # a quick look
    python -m benchmarks.training --device cuda        # the same on a GPU (mixed precision)

Runs `python -m sd train all --minutes M` into --out, then prints for each stage its steps, minutes and figures
(VAE: reconstruction PSNR; text encoder: caption retrieval accuracy, short and full captions; UNet: final loss),
and the prompt accuracy of the result as `python -m sd evaluate` prints it: every attribute and the whole caption,
held-out combinations apart, at generate's defaults (50 DDIM steps, guidance 7.5) and at the evaluation's settings.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

BUDGET_MINUTES = 30.0        # the budget goal: >= 90% whole-caption accuracy after 30 minutes on 2 CPU cores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=BUDGET_MINUTES, help="total training budget")
    parser.add_argument("--out", default="runs/benchmark", help="output folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 resists contention best)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from sd.cli import main as sd_main
    start = time.time()
    train_args = ["train", "all", "--minutes", str(args.minutes), "--out", args.out, "--seed", str(args.seed),
                  "--quiet"]
    if args.device:
        train_args += ["--device", args.device]
    if args.threads:
        train_args += ["--threads", str(args.threads)]
    if sd_main(train_args) != 0:
        raise SystemExit("training failed (see the line above)")
    train_minutes = (time.time() - start) / 60

    import sd
    from sd.training.evaluation import evaluate_model, format_report
    from sd.training import read_stage
    print(f"\n== training, budget {args.minutes:g} min, device "
          f"{args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}, {torch.get_num_threads()} threads ==")
    for stage in ("vae", "text", "unet"):
        _, meta = read_stage(f"{args.out}/{stage}.safetensors")
        figures = {"steps": meta["step"], "minutes": round(meta["seconds"] / 60, 2),
                   "final_loss": round(sum(meta["losses"][-20:]) / len(meta["losses"][-20:]), 4)}
        if "psnr" in meta:
            figures["psnr_db"] = round(meta["psnr"], 2)
        if "retrieval_accuracy" in meta:
            figures["caption_retrieval_accuracy"] = round(meta["retrieval_accuracy"], 3)
        if "full_caption_retrieval_accuracy" in meta:
            figures["full_caption_retrieval_accuracy"] = round(meta["full_caption_retrieval_accuracy"], 3)
        print(f"{stage:>5}: {json.dumps(figures)}")
    print(f"total wall clock (data, encoding, checkpoints included): {train_minutes:.1f} min")
    model = sd.load_checkpoint(f"{args.out}/model.safetensors", device=args.device)
    print(format_report(evaluate_model(model)))


if __name__ == "__main__":
    main()
