"""The notebooks' GPU branch (FULL_SIZE) runs before a learner's Colab does: forced on this CPU.

`SD_FULL_SIZE=1` makes the set-up cell take the GPU's path on any device; `SD_FULL_SIDE` and `SD_FULL_STEPS`
shrink that path's image side and step count; `SD_CHECKPOINT` points at a stand-in for SD v1.5's file with its
very 1,131 keys at small widths (tools/make_full_layout_checkpoint.py). Every solution notebook then runs top to
bottom under nbval (those whose code has a GPU path: a FULL_SIZE branch or the course model),
so each line that only a GPU would run is executed once per test run (the CUDA-only calls
themselves stay behind `DEVICE.type == "cuda"`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

from tools.make_full_layout_checkpoint import main as make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# 4 steps, not 2: image-to-image at strength 0.3 must keep at least one step (int(0.3 * 4) = 1)
FORCED = {"SD_FULL_SIZE": "1", "SD_FULL_SIDE": "64", "SD_FULL_STEPS": "4", "SD_TRAIN_SECONDS": "4"}
# Code that only the GPU path runs: a FULL_SIZE branch, or the course model, which is SD v1.5 there
GPU_PATH_MARKERS = ("FULL_SIZE", "FULL_SIDE", "FULL_STEPS", "load_course_model")


def setup_cell_source() -> str:
    nb = nbformat.read(ROOT / "solutions" / "00_start_here.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.get("id") == "course-setup")


def notebooks_with_a_gpu_path() -> list[str]:
    """The solution notebooks whose code (past the shared set-up cell) takes another path on a GPU."""
    names = []
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        code = "\n".join(c.source for c in cells if c.cell_type == "code" and c.get("id") != "course-setup")
        if any(marker in code for marker in GPU_PATH_MARKERS):
            names.append(f"solutions/{path.name}")
    return names


def run_setup(env: dict[str, str]) -> str:
    code = setup_cell_source() + "\nprint('SIZES', FULL_SIZE, FULL_SIDE, FULL_STEPS)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "solutions", env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_setup_cell_takes_the_gpu_path_only_when_forced():
    plain = {k: v for k, v in os.environ.items() if k not in FORCED}
    assert run_setup(plain) == "SIZES False 512 50"                     # a CPU, as the learner's laptop
    assert run_setup({**plain, **FORCED}) == "SIZES True 64 4"


def test_every_solution_notebook_runs_its_gpu_branch_on_a_cpu(tmp_path):
    notebooks = notebooks_with_a_gpu_path()
    assert "solutions/09_text_to_image.ipynb" in notebooks and "solutions/00_start_here.ipynb" not in notebooks
    checkpoint = tmp_path / "sd15_layout.safetensors"
    assert make_checkpoint([str(checkpoint)]) == 0
    env = {**os.environ, **FORCED, "SD_CHECKPOINT": str(checkpoint)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
               "-n", "2", "--dist", "loadfile", *notebooks]                 # two workers, each notebook whole
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, "the forced FULL_SIZE run failed:\n" + result.stdout[-6000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
