"""Generate the learners' notebooks (notebooks/) from the solved ones (solutions/), the single source.

    python tools/make_notebooks.py                      # refresh headers in solutions/, regenerate notebooks/
    python tools/make_notebooks.py --execute 01_attention   # run solutions/01_attention.ipynb in place first
    python tools/make_notebooks.py --execute 01_attention --only 01   # ... and regenerate only notebook 01
    python tools/make_notebooks.py --check              # exit 1 when notebooks/ or the headers are out of date
    python tools/make_notebooks.py --readme             # print the README's table of notebooks with Colab badges

In a solutions cell, the code between two marker lines becomes, in the learner's version, a stub at the
indentation of the BEGIN line. The BEGIN line says in words what to compute (no code); the HINT lines under it
are the further levels of help, from an idea to code:

        # BEGIN SOLUTION 1.1 hint: compare every query with every key, scale, normalise, average the values
        # HINT 1.1: the insight: a query's weights are a softmax of its dot products with the keys, scaled by 1/√d
        # HINT 1.1: the plan: scores (B, H, Tq, Tk) from q and k; softmax over the keys; weights times v
        # HINT 1.1: a skeleton (fill the blanks):
        # |     scores = ___          # (B, H, Tq, Tk)
        # |     return ___ @ v
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        ...
        # END SOLUTION
    ->
        # Exercise 1.1: your code here (more help: hint("1.1"); the answer: solution("1.1"))
        raise NotImplementedError("Exercise 1.1: compare every query with every key, scale, normalise, ...")

Everything else stays identical, except that the learners' notebooks carry no outputs or execution counts, and
their exercise cells are tagged `raises-exception` so that nbval accepts the NotImplementedError there.
The hints and the solution code of every exercise go to sd/course/exercises/NN_topic.json, which
`sd.course.hint("1.1")` (the next level each time) and `sd.course.solution("1.1")` read, offline.
The first cells of every notebook, in both folders, are written here from REPOSITORY: the "Open in Colab"
badge, and (after the authored introduction) the set-up cell that installs the package on Colab.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling module, however this file is loaded
# code_in_words is re-exported for the tests
from exercise_markers import (NotebookError, code_in_words, exercise_help, help_problems,  # noqa: E402,F401
                              scan_blocks, stub_source)

# The one place the repository is named: badges and Colab set-up cells are generated from it.
REPOSITORY = "https://github.com/sd-from-scratch/sd-from-scratch"
BRANCH = "main"
PACKAGE = "sd-from-scratch"   # the distribution name in pyproject.toml

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = "solutions"
NOTEBOOKS = "notebooks"
NOTEBOOK_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
# Solutions are committed with their outputs; keep each readable on GitHub.
MAX_SOLUTION_BYTES = 2_000_000
EXERCISES = Path("sd") / "course" / "exercises"   # the hints and solutions, one JSON file per notebook

EXERCISE_TAGS = ["exercise", "raises-exception"]   # nbval: `raises-exception` lets the cell raise
HEADER_KEY = "course_header"                        # cell metadata marking the generated cells
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# Colab reads these: open on a GPU runtime.
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}

SETUP_SOURCE = '''\
# Set-up (the same in every notebook, written by tools/make_notebooks.py): on Colab, install the course's
# package from its repository; everywhere, pick the device, the number format, the memory savers and FULL_SIZE,
# the one setting that sizes the notebook.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["{package}[colab] @ git+{repository}@{branch}"], check=True)
    importlib.invalidate_caches()
elif importlib.util.find_spec("sd") is None and Path("../sd/__init__.py").exists():
    sys.path.insert(0, str(Path("..").resolve()))   # a clone without `pip install -e .`: use its sd/

import torch
from sd.course import hint, predict, solution
from sd.runtime import detect_runtime, env_flag, env_int, env_path

# float16 on a T4, bfloat16 on an A100/L4/H100, float16 on Apple Silicon (MPS), float32 on a CPU;
# memory savers chosen by the GPU's memory
RUNTIME = detect_runtime()
DEVICE, DTYPE = RUNTIME.device, RUNTIME.dtype
# True on a CUDA GPU: full-size SD v1.5 at 512 x 512. False on a CPU: small sizes, few steps, the same code path.
# On a Mac (MPS), full size only with SD v1.5's file named in $SD_CHECKPOINT (nothing is downloaded there).
# CI also runs the GPU's path on its CPU ($SD_FULL_SIZE=1), with a tiny image side and step count.
FULL_SIZE = (DEVICE.type == "cuda" or (DEVICE.type == "mps" and env_path("SD_CHECKPOINT") is not None)
             or env_flag("SD_FULL_SIZE"))
FULL_SIDE = env_int("SD_FULL_SIDE", 512, minimum=8, maximum=2048,
                    what="an image side in pixels")    # the GPU path's image side (SD v1.5: 512)
FULL_STEPS = env_int("SD_FULL_STEPS", 50, minimum=1, maximum=1000,
                     what="a number of sampling steps")   # the GPU path's sampling steps (SD's default: 50)

print(f"{{RUNTIME}}; FULL_SIZE = {{FULL_SIZE}}"
      + ("; for a GPU: Runtime > Change runtime type" if DEVICE.type == "cpu" and "google.colab" in sys.modules
         else ""))'''


def check_python(source: str, where: str) -> None:
    """Raise NotebookError unless the cell parses as Python (IPython magics and shell lines left out)."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))
    try:
        ast.parse(code)
    except SyntaxError as e:
        raise NotebookError(f"{where}: not valid Python after stubbing (line {e.lineno}: {e.msg})") from None


# ----------------------------------------------------------------------------------------------------------
# Generated header cells: the Colab badge and the set-up cell
# ----------------------------------------------------------------------------------------------------------

def colab_url(folder: str, name: str) -> str:
    """The 'Open in Colab' address of folder/name on GitHub."""
    path = REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/{folder}/{name}"


def badge(folder: str, name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(folder, name)})")


def header_cells(folder: str, name: str) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """The badge cell and the set-up cell of folder/name."""
    text = badge(folder, name)
    if folder == SOLUTIONS:
        text += (f" &nbsp; *The solved notebook. The exercises are in "
                 f"[{NOTEBOOKS}/{name}](../{NOTEBOOKS}/{name}).*")
    badge_cell = nbformat.v4.new_markdown_cell(text, id="course-badge")
    badge_cell.metadata[HEADER_KEY] = "badge"
    setup = SETUP_SOURCE.format(package=PACKAGE, repository=REPOSITORY, branch=BRANCH)
    setup_cell = nbformat.v4.new_code_cell(setup, id="course-setup")
    setup_cell.metadata[HEADER_KEY] = "setup"
    return badge_cell, setup_cell


def with_headers(nb: nbformat.NotebookNode, folder: str, name: str) -> nbformat.NotebookNode:
    """nb with fresh header cells: badge first, set-up after the first authored (introduction) markdown cell.

    A header cell whose source did not change keeps its outputs (the executed set-up cell in solutions/).
    """
    nb = copy.deepcopy(nb)
    old = {cell.metadata.get(HEADER_KEY): cell for cell in nb.cells if HEADER_KEY in cell.metadata}
    cells = [cell for cell in nb.cells if HEADER_KEY not in cell.metadata]
    badge_cell, setup_cell = header_cells(folder, name)
    if "setup" in old and old["setup"].source == setup_cell.source:
        setup_cell.outputs = old["setup"].outputs
        setup_cell.execution_count = old["setup"].execution_count
    intro = next((i for i, cell in enumerate(cells) if cell.cell_type == "markdown"), -1)
    cells.insert(intro + 1, setup_cell)
    nb.cells = [badge_cell] + cells
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.update(copy.deepcopy(COLAB_METADATA))
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


# ----------------------------------------------------------------------------------------------------------
# Whole notebooks
# ----------------------------------------------------------------------------------------------------------

def notebook_number(name: str) -> int:
    match = NOTEBOOK_NAME.match(name)
    if not match:
        raise NotebookError(f"{name}: notebooks are named NN_topic.ipynb (two digits, lowercase topic)")
    return int(match.group(1))


def solution_notebook(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The solutions notebook as committed: refreshed headers, checked markers, nothing else touched."""
    number = notebook_number(name)
    nb = with_headers(nb, SOLUTIONS, name)
    for i, cell in enumerate(nb.cells):
        where = f"{SOLUTIONS}/{name}, cell {i}"
        if cell.cell_type != "code":
            continue
        if "raises-exception" in cell.metadata.get("tags", []):
            raise NotebookError(f"{where}: solution cells must not be tagged raises-exception "
                                "(it would hide a failing solution from nbval)")
        _, numbers = stub_source(cell.source, where)
        wrong = [n for n in numbers if int(n.split(".")[0]) != number]
        if wrong:
            raise NotebookError(f"{where}: exercise {wrong[0]} in notebook {number:02d}; "
                                f"number its exercises {number}.1, {number}.2, ...")
    return nb


def learner_notebook(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The learner's version: stubs instead of solutions, no outputs, exercise cells tagged for nbval."""
    nb = copy.deepcopy(solution_notebook(solution, name))
    nb = with_headers(nb, NOTEBOOKS, name)
    nb.metadata.pop("widgets", None)   # widget state belongs to an executed notebook
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)   # nbclient's timings
        if cell.cell_type != "code":
            continue
        where = f"{SOLUTIONS}/{name}, cell {i}"
        cell.source, numbers = stub_source(cell.source, where)
        check_python(cell.source, where)
        cell.outputs, cell.execution_count = [], None
        if numbers:
            tags = cell.metadata.get("tags", [])
            cell.metadata["tags"] = tags + [t for t in EXERCISE_TAGS if t not in tags]
    return nb


def notebook_exercises(solution: nbformat.NotebookNode, name: str) -> dict:
    """The hints and solutions of a solutions notebook, as sd/course/exercises/NN_topic.json holds them."""
    blocks = []
    for i, cell in enumerate(solution.cells):
        if cell.cell_type == "code":
            blocks += scan_blocks(cell.source, f"{SOLUTIONS}/{name}, cell {i}")[1]
    return {"notebook": Path(name).stem,
            "written_by": "tools/make_notebooks.py from the markers in solutions/ (do not edit by hand)",
            "exercises": exercise_help(blocks, f"{SOLUTIONS}/{name}")}


def render_exercises(exercises: dict) -> str:
    return json.dumps(exercises, indent=1, ensure_ascii=False) + "\n"


def render(nb: nbformat.NotebookNode) -> str:
    """The file's text: nbformat's own layout (as Jupyter and nbclient write it), ending in a newline."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def planned_files(root: Path = ROOT, only: list[str] | None = None) -> dict[Path, str]:
    """Every file the generator owns (or those of the notebooks in `only`, e.g. ["07"]), with the text it should have."""
    files = {}
    for path in sorted((root / SOLUTIONS).glob("*.ipynb")):
        if only and not any(path.stem.startswith(prefix) for prefix in only):
            continue
        solution = solution_notebook(read(path), path.name)
        files[path] = render(solution)
        files[root / NOTEBOOKS / path.name] = render(learner_notebook(solution, path.name))
        files[root / EXERCISES / f"{path.stem}.json"] = render_exercises(notebook_exercises(solution, path.name))
    return files


def problems(root: Path = ROOT) -> list[str]:
    """What is out of date or wrong (empty when everything is as the generator would write it)."""
    found = []
    planned = planned_files(root)
    for path, text in planned.items():
        rel = path.relative_to(root)
        if not path.exists():
            found.append(f"{rel} is missing")
        elif path.read_text(encoding="utf-8") != text:
            found.append(f"{rel} is out of date")
    for path in sorted((root / NOTEBOOKS).glob("*.ipynb")) + sorted((root / EXERCISES).glob("*.json")):
        if path not in planned:
            found.append(f"{path.relative_to(root)} has no solutions/{path.stem}.ipynb (remove it)")
    for path, text in planned.items():
        if path.suffix == ".json":
            for number, help_ in json.loads(text)["exercises"].items():
                found += [f"{path.relative_to(root)}: {p}" for p in help_problems(number, help_)]
    for path in sorted((root / SOLUTIONS).glob("*.ipynb")):
        size = path.stat().st_size
        if size > MAX_SOLUTION_BYTES:
            found.append(f"{path.relative_to(root)} is {size / 1e6:.1f} MB (keep it under "
                         f"{MAX_SOLUTION_BYTES / 1e6:.0f} MB: smaller or fewer figures)")
        unrun = [i for i, c in enumerate(read(path).cells)
                 if c.cell_type == "code" and c.source.strip() and c.execution_count is None]
        if unrun:
            found.append(f"{path.relative_to(root)}: code cells {unrun} have not been run (commit solutions "
                         f"with outputs: python tools/make_notebooks.py --execute {path.stem})")
    return found


def execute(path: Path, timeout: int = 600) -> None:
    """Run a solutions notebook top to bottom in its folder and save it with its outputs."""
    from nbclient import NotebookClient
    nb = solution_notebook(read(path), path.name)
    NotebookClient(nb, timeout=timeout, kernel_name=KERNELSPEC["name"], record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    path.write_text(render(nb), encoding="utf-8")


def readme_table(root: Path = ROOT) -> str:
    """A markdown table of the notebooks: title (first heading of the introduction) and Colab badges."""
    rows = ["| # | notebook | exercises | solutions |", "|---|---|---|---|"]
    for path in sorted((root / SOLUTIONS).glob("*.ipynb")):
        nb = read(path)
        title = next((line.lstrip("# ").strip() for c in nb.cells if c.cell_type == "markdown"
                      and HEADER_KEY not in c.metadata for line in c.source.splitlines() if line.startswith("#")),
                     path.stem)
        rows.append(f"| {path.name[:2]} | [{title}]({NOTEBOOKS}/{path.name}) | {badge(NOTEBOOKS, path.name)} | "
                    f"{badge(SOLUTIONS, path.name)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is out of date (exit 1 if any)")
    parser.add_argument("--execute", nargs="*", metavar="NN_topic",
                        help="execute these solutions notebooks in place first (all when none is named)")
    parser.add_argument("--readme", action="store_true", help="print the README table of notebooks")
    parser.add_argument("--only", nargs="+", metavar="NN",
                        help="regenerate only these notebooks (e.g. --only 07 08); the others are left as they are")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root
    try:
        if args.readme:
            print(readme_table(root))
            return 0
        if args.check:
            found = problems(root)
            for line in found:
                print(f"✗ {line}")
            if found:
                print("Regenerate notebooks/ with: python tools/make_notebooks.py "
                      "(and --execute NN_topic to run a solutions notebook)")
                return 1
            print(f"✓ {NOTEBOOKS}/ and {SOLUTIONS}/ are up to date")
            return 0
        if args.execute is not None:
            names = args.execute or [p.stem for p in sorted((root / SOLUTIONS).glob("*.ipynb"))]
            for stem in names:
                path = root / SOLUTIONS / (stem if stem.endswith(".ipynb") else f"{stem}.ipynb")
                print(f"executing {path.relative_to(root)}")
                execute(path)
        (root / NOTEBOOKS).mkdir(exist_ok=True)
        (root / EXERCISES).mkdir(parents=True, exist_ok=True)
        for path, text in planned_files(root, args.only).items():
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path.relative_to(root)}")
            if path.suffix == ".json":
                for number, help_ in json.loads(text)["exercises"].items():
                    for problem in help_problems(number, help_):
                        print(f"⚠ {path.relative_to(root)}: {problem}")
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
