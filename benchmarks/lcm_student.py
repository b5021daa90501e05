"""The shipped LCM-LoRA student against its teacher, the shipped model: accuracy, Fréchet distance, time (not a test).

    OMP_NUM_THREADS=1 python -m benchmarks.lcm_student                     # per_prompt 2, seed 0
    python -m benchmarks.lcm_student --per-prompt 4 --seeds 0 1            # the evaluation's default size, 2 seeds

Every run draws `python -m sd evaluate`'s prompt set (108 full captions: 6 held-out and 12 seen combinations, six
layouts each), per_prompt pictures per caption, in one batch, through the model's own pipeline. The judge (the
shipped attribute classifier) says whether each picture shows the whole caption; the Fréchet distance is FID's
formula on the judge's pooled features against real drawings of the same captions (lower is better; two real sets
give the floor). The time per image is the wall-clock time of the batch (sampling and decoding) over its size,
single-threaded on a shared CPU: compare rows, not machines.
Rows: the student (LoRA loaded with pipe.load_lora_weights, sampler "lcm") at 1, 2, 4, 8 steps and guidance 1
(no second UNet pass: the teacher's guidance is in the LoRA) and 1.5; the teacher with DDIM at 4, 8 and 50 steps
at the evaluation's guidance 5; the teacher with the LCM sampler and no distillation at 1, 2, 4, 8 steps, guidance 1.5.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import sd
from sd.training.consistency import LCM_LORA_FILE
from sd.training.evaluation import DEFAULT_GUIDANCE, load_classifier, prompt_accuracy, prompt_set

RESULTS = Path(__file__).resolve().parent / "results" / "lcm_student_cpu.txt"
# (label, which model, sampler, steps, guidance scale)
RUNS = ([("student", "student", "lcm", n, 1.0) for n in (1, 2, 4, 8)]
        + [("student", "student", "lcm", n, 1.5) for n in (2, 4)]
        + [("teacher", "teacher", "ddim", n, DEFAULT_GUIDANCE) for n in (4, 8, 50)]
        + [("teacher, LCM sampler, not distilled", "teacher", "lcm", n, 1.5) for n in (1, 2, 4, 8)])


def measure(pipe, judge, sampler: str, steps: int, guidance: float, per_prompt: int, seed: int) -> dict:
    """Whole-caption accuracy, Fréchet distance (and its real-against-real floor) and seconds per image of one run."""
    r = prompt_accuracy(pipe, judge, guidance, steps, per_prompt, seed, sampler=sampler)
    return {"accuracy": r["accuracy"], "fd": r["frechet_distance"], "floor": r["frechet_floor"],
            "seconds": r["seconds_per_image"], "images": r["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lora", default=str(LCM_LORA_FILE))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    judge = load_classifier()
    teacher = sd.load_checkpoint()
    student = sd.load_checkpoint()
    student.load_lora_weights(args.lora)
    models = {"teacher": teacher, "student": student}
    lines = [f"# benchmarks/lcm_student.py --per-prompt {args.per_prompt} --seeds {' '.join(map(str, args.seeds))}"
             f" (torch {torch.__version__}, {torch.get_num_threads()} thread(s), shared CPU)",
             f"# {len(prompt_set())} captions x {args.per_prompt} pictures per seed; student = {Path(args.lora).name}",
             f"{'model':<38} {'sampler':<7} {'steps':>5} {'scale':>5}  {'whole caption':>13}  {'Frechet':>8}"
             f"  {'(floor)':>7}  {'s/image':>8}"]
    print("\n".join(lines), flush=True)
    for label, which, sampler, steps, guidance in RUNS:
        runs = [measure(models[which], judge, sampler, steps, guidance, args.per_prompt, s) for s in args.seeds]
        acc = [r["accuracy"] for r in runs]
        fd = [r["fd"] for r in runs]
        spread = (lambda v: f"±{statistics.stdev(v):.3f}" if len(v) > 1 else "")
        line = (f"{label:<38} {sampler:<7} {steps:>5} {guidance:>5g}  {statistics.mean(acc):>8.3f}{spread(acc):>5}"
                f"  {statistics.mean(fd):>8.1f}  {statistics.mean(r['floor'] for r in runs):>7.1f}"
                f"  {statistics.mean(r['seconds'] for r in runs):>8.4f}")
        print(line, flush=True)
        lines.append(line)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
