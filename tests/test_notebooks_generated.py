"""notebooks/ is generated from solutions/ by tools/make_notebooks.py: it is up to date, and the stubbing is right."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

import sd.course
import sd.course.hints

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
make_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_notebooks)

SOLVED_CELL = '''\
def double(x):
    """Twice x."""
    # BEGIN SOLUTION 1.1 hint: add x to itself, or multiply by 2
    # HINT 1.1: the sum of x and x is twice x
    # HINT 1.1: add, keep the result, give it back
    # HINT 1.1: a skeleton:
    # |     y = ___
    # |     return y
    y = x + x
    return y
    # END SOLUTION


class Counter:
    def __init__(self):
        # BEGIN SOLUTION 1.2 hint: start at "zero"
        # HINT 1.2: the count starts at nothing
        # HINT 1.2: one attribute, n
        # HINT 1.2: the attribute n is ___
        self.n = 0
        # END SOLUTION'''


def synthetic_notebook() -> nbformat.NotebookNode:
    """A small solved notebook: an introduction, an exercise cell with two exercises, a check cell."""
    intro = nbformat.v4.new_markdown_cell("# 01 · Demo\n\nWhat you build.")
    exercise = nbformat.v4.new_code_cell(SOLVED_CELL, execution_count=1)
    check = nbformat.v4.new_code_cell("print(double(2))", execution_count=2,
                                      outputs=[nbformat.v4.new_output("stream", name="stdout", text="4\n")])
    return nbformat.v4.new_notebook(cells=[intro, exercise, check])


def test_notebooks_folder_is_up_to_date_with_solutions():
    found = make_notebooks.problems(ROOT)
    assert not found, "\n".join(found) + "\nRegenerate with: python tools/make_notebooks.py"


def test_every_solution_has_its_learner_notebook_with_exercises():
    solutions = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
    assert "00_start_here.ipynb" in solutions and "01_attention.ipynb" in solutions
    for name in solutions:
        learner = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in learner.cells if c.cell_type == "code"), f"{name}: learner cells must have no outputs"
        assert "BEGIN SOLUTION" not in "".join(c.source for c in learner.cells)


def test_stub_replaces_each_solution_with_a_not_implemented_error_at_its_indentation():
    stubbed, numbers = make_notebooks.stub_source(SOLVED_CELL)
    assert numbers == ["1.1", "1.2"]
    assert "x + x" not in stubbed and "self.n = 0" not in stubbed and "SOLUTION" not in stubbed
    assert "HINT" not in stubbed and "the sum of x" not in stubbed
    assert ('    """Twice x."""\n    # Exercise 1.1: your code here (more help: hint("1.1"); the answer: '
            'solution("1.1"))\n    raise NotImplementedError("Exercise 1.1: add x to itself, or multiply by 2")') in stubbed
    assert '        raise NotImplementedError("Exercise 1.2: start at \\"zero\\"")' in stubbed
    namespace = {}
    exec(stubbed, namespace)   # the stub is valid Python: the function and class are defined
    with pytest.raises(NotImplementedError, match=r"^Exercise 1\.1: add x to itself, or multiply by 2$"):
        namespace["double"](3)
    with pytest.raises(NotImplementedError, match='Exercise 1.2: start at "zero"'):
        namespace["Counter"]()


def test_generator_writes_learner_notebook_and_headers_from_a_synthetic_solution(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    nbformat.write(synthetic_notebook(), tmp_path / "solutions" / "01_demo.ipynb")

    assert make_notebooks.main(["--root", str(tmp_path)]) == 0
    solution = nbformat.read(tmp_path / "solutions" / "01_demo.ipynb", as_version=4)
    learner = nbformat.read(tmp_path / "notebooks" / "01_demo.ipynb", as_version=4)

    # headers: badge first, the authored introduction, then the set-up cell; each badge points at its own folder
    for nb, folder in [(solution, "solutions"), (learner, "notebooks")]:
        assert [c.metadata.get("course_header") for c in nb.cells[:3]] == ["badge", None, "setup"]
        assert (f"https://colab.research.google.com/github/sd-from-scratch/sd-from-scratch/blob/main/"
                f"{folder}/01_demo.ipynb") in nb.cells[0].source
        setup = nb.cells[2].source
        assert '"google.colab" in sys.modules' in setup
        assert "git+https://github.com/sd-from-scratch/sd-from-scratch@main" in setup
        assert nb.metadata["accelerator"] == "GPU"
    # solutions keep their code and outputs; the learner's version is stubbed, tagged and without outputs
    assert solution.cells[3].source == SOLVED_CELL and solution.cells[4].outputs[0].text == "4\n"
    exercise, check = learner.cells[3], learner.cells[4]
    assert exercise.source == make_notebooks.stub_source(SOLVED_CELL)[0]
    assert exercise.metadata["tags"] == ["exercise", "raises-exception"]
    assert "tags" not in check.metadata and check.source == "print(double(2))"
    assert check.outputs == [] and check.execution_count is None and exercise.execution_count is None
    assert learner.cells[1].source == solution.cells[1].source == "# 01 · Demo\n\nWhat you build."

    # --check: clean once the solution's set-up cell has run (as --execute does); fails on a hand edit of
    # notebooks/ and on an orphan learner notebook
    solution.cells[2].execution_count = 1
    nbformat.write(solution, tmp_path / "solutions" / "01_demo.ipynb")
    assert make_notebooks.main(["--root", str(tmp_path)]) == 0
    assert make_notebooks.main(["--root", str(tmp_path), "--check"]) == 0
    edited = tmp_path / "notebooks" / "01_demo.ipynb"
    edited.write_text(edited.read_text().replace("print(double(2))", "print(double(3))"))
    assert make_notebooks.main(["--root", str(tmp_path), "--check"]) == 1
    assert "notebooks/01_demo.ipynb is out of date" in capsys.readouterr().out
    assert make_notebooks.main(["--root", str(tmp_path)]) == 0
    nbformat.write(learner, tmp_path / "notebooks" / "02_orphan.ipynb")
    assert make_notebooks.main(["--root", str(tmp_path), "--check"]) == 1
    assert "02_orphan.ipynb has no solutions/02_orphan.ipynb" in capsys.readouterr().out


def test_check_reports_solutions_that_were_not_run(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    nb = synthetic_notebook()
    nb.cells[2].execution_count = None
    nb.cells[2].outputs = []
    nbformat.write(nb, tmp_path / "solutions" / "01_demo.ipynb")
    make_notebooks.main(["--root", str(tmp_path)])
    assert make_notebooks.main(["--root", str(tmp_path), "--check"]) == 1
    assert "have not been run" in capsys.readouterr().out


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION 1.1 hint: h\nx = 1", "never closed"),
    ("x = 1\n# END SOLUTION", "END SOLUTION without a BEGIN"),
    ("# BEGIN SOLUTION 1.1 hint: h\n# BEGIN SOLUTION 1.2 hint: h\n# END SOLUTION", "inside the block"),
    ("# BEGIN SOLUTION 1.1\nx = 1\n# END SOLUTION", "malformed marker"),
])
def test_bad_markers_are_reported_with_the_line(source, message):
    with pytest.raises(make_notebooks.NotebookError, match=message):
        make_notebooks.stub_source(source, "solutions/01_demo.ipynb, cell 3")


def test_exercise_numbers_must_match_the_notebook_and_solutions_must_not_hide_errors():
    nb = synthetic_notebook()
    with pytest.raises(make_notebooks.NotebookError, match="exercise 1.1 in notebook 02"):
        make_notebooks.solution_notebook(nb, "02_demo.ipynb")
    nb.cells[2].metadata["tags"] = ["raises-exception"]
    with pytest.raises(make_notebooks.NotebookError, match="must not be tagged raises-exception"):
        make_notebooks.solution_notebook(nb, "01_demo.ipynb")
    with pytest.raises(make_notebooks.NotebookError, match="named NN_topic.ipynb"):
        make_notebooks.solution_notebook(synthetic_notebook(), "demo.ipynb")


def test_a_stub_that_breaks_the_syntax_is_refused():
    nb = synthetic_notebook()
    # a block that ends inside an open bracket leaves invalid Python behind
    nb.cells[1].source = "x = [\n    # BEGIN SOLUTION 1.1 hint: h\n    1,\n    # END SOLUTION\n]"
    with pytest.raises(make_notebooks.NotebookError, match="not valid Python after stubbing"):
        make_notebooks.learner_notebook(nb, "01_demo.ipynb")


# ---------------------------------------------------------------------------------------------------------
# Help in stages: the stub's sentence in words, hint() level by level, solution() only when asked
# ---------------------------------------------------------------------------------------------------------

# Code-like text a stub's sentence must not contain (written here, independently of the generator's list).
CODE_PATTERNS = {
    "assignment or comparison": re.compile(r"="),
    "call syntax": re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\("),
    "indexing": re.compile(r"\["),
    "attribute or method access": re.compile(r"[A-Za-z_)\]]\.[A-Za-z_]"),
    "a library prefix": re.compile(r"\b(torch|np|math)\b"),
}


def learner_stub_messages() -> list[tuple[str, str]]:
    """(notebook, message) of every `raise NotImplementedError("...")` in notebooks/, read with ast."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                        and getattr(node.exc.func, "id", None) == "NotImplementedError"):
                    found.append((path.name, node.exc.args[0].value))
    return found


def solution_blocks() -> dict[str, list[str]]:
    """Exercise number -> the code lines between its markers in solutions/ (markers and HINT lines left out)."""
    blocks: dict[str, list[str]] = {}
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            number = None
            for line in cell.source.split("\n") if cell.cell_type == "code" else []:
                begin = re.match(r"\s*# BEGIN SOLUTION (\d+\.\d+) hint:", line)
                if begin:
                    number = begin.group(1)
                    blocks.setdefault(number, [])
                elif re.match(r"\s*# END SOLUTION", line):
                    number = None
                elif number and not re.match(r"\s*# (HINT |\|)", line):
                    blocks[number].append(line)
    return blocks


def test_every_stub_says_what_to_compute_in_words_not_code():
    messages = learner_stub_messages()
    assert len(messages) >= 33
    for name, message in messages:
        assert re.match(r"^Exercise \d+\.\d+: \S", message), f"{name}: {message!r}"
        sentence = message.split(": ", 1)[1]
        for what, pattern in CODE_PATTERNS.items():
            assert not pattern.search(sentence), f"{name}: the stub contains {what}: {message!r}"


def test_the_word_check_refuses_the_old_code_hint():
    old = ("out = unet(torch.cat([x, x]), torch.cat([uncond_context, context]), t); "
           "eps_uncond, eps_cond = out.chunk(2)")
    assert make_notebooks.code_in_words(old) is not None
    assert make_notebooks.code_in_words("scale the scores by one over the square root of d") is None
    cell = f"# BEGIN SOLUTION 1.1 hint: {old}\n# HINT 1.1: a\n# HINT 1.1: b\nx = 1\n# END SOLUTION"
    with pytest.raises(make_notebooks.NotebookError, match="contains an assignment"):
        make_notebooks.stub_source(cell, "solutions/01_demo.ipynb, cell 3")


def all_exercise_numbers() -> list[str]:
    return sorted(solution_blocks(), key=lambda n: tuple(int(p) for p in n.split(".")))


def test_every_exercise_has_three_hints_none_with_the_solutions_code():
    """The insight, the plan, a skeleton with blanks; no hint repeats a line of the solution (help_problems)."""
    numbers = all_exercise_numbers()
    assert len(numbers) >= 31
    found = []
    for number in numbers:
        levels = sd.course.hints.hint_levels(number)
        assert all(level.strip() for level in levels)
        assert len(set(levels)) == len(levels), f"exercise {number} repeats a hint"
        help_ = sd.course.hints._exercise(number, "test")[1]
        found += make_notebooks.help_problems(number, help_)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("hints, solution, problem", [
    (["idea", "plan"], "y = x + x", "has 2 hints, expected at least 3"),
    (["idea", "plan", "no blank here"], "y = x + x", "not a skeleton with blanks"),
    (["idea", "plan", "fill in:\nscores = q @ k.transpose(-2, -1)\nreturn ___"],
     "scores = q @ k.transpose(-2, -1)\nreturn scores", "hint 3 repeats the solution's code"),
    (["use scores = q @ k.transpose(-2, -1) here", "plan", "___"],
     "scores = q @ k.transpose(-2, -1)", "hint 1 repeats the solution's code"),
])
def test_help_problems_finds_each_broken_rule(hints, solution, problem):
    found = make_notebooks.help_problems("1.1", {"stub": "words", "hints": hints, "solution": solution})
    assert any(problem in f for f in found), found


def test_help_problems_accepts_a_skeleton_with_blanks():
    help_ = {"stub": "words", "hints": ["idea", "plan", "scores = ___\nreturn ___ @ v"],
             "solution": "scores = q @ k.transpose(-2, -1)\nreturn scores.softmax(-1) @ v"}
    assert make_notebooks.help_problems("1.1", help_) == []


def test_hint_walks_the_levels_in_order_then_points_at_the_solution(capsys):
    sd.course.hints.reset_hints()
    levels = sd.course.hints.hint_levels("7.4")
    for i, level in enumerate(levels, start=1):
        sd.course.hint("7.4")
        out = capsys.readouterr().out
        assert out.startswith(f"Hint {i} of {len(levels)} for exercise 7.4")
        assert level.split("\n")[0] in out
    assert "___" in levels[-1]   # the last level is a skeleton with blanks
    assert "skeleton" in out
    sd.course.hint("7.4")
    assert 'no more hints' in capsys.readouterr().out
    sd.course.hints.reset_hints()
    sd.course.hint("7.4")
    assert capsys.readouterr().out.startswith("Hint 1 of")


def test_solution_prints_the_code_between_the_markers(capsys):
    blocks = solution_blocks()
    for number in ["0.1", "3.2", "7.4", "2.1"]:
        sd.course.solution(number)
        out = capsys.readouterr().out
        code = [line.strip() for line in blocks[number] if line.strip()]
        assert code and all(line in out for line in code), f"exercise {number}:\n{out}"
        assert "HINT" not in out and "BEGIN SOLUTION" not in out


def test_the_learners_notebooks_hold_no_solution_code():
    blocks = solution_blocks()
    by_number: dict[str, list[str]] = {}      # "3": the exercise cells of 03_clip
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        by_number.setdefault(path.name[:2].lstrip("0") or "0", []).extend(
            c.source for c in cells if "exercise" in c.metadata.get("tags", []))
    for number, exercise_cells in by_number.items():
        text = "\n".join(exercise_cells)
        for ex, lines in blocks.items():
            if ex.split(".")[0] != number:
                continue
            code = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            assert code, ex
            leaked = [line for line in code if len(line) > 12 and line in text]
            assert not leaked, f"{path.name}: exercise {ex}'s solution is in the learner's cell: {leaked}"
            assert f'raise NotImplementedError("Exercise {ex}:' in text


@pytest.mark.parametrize("bad, error, message", [
    (7.4, TypeError, 'as a string such as "7.4", got float 7.4'),
    ("six", ValueError, "got 'six'"),
    ("7.9", ValueError, "there is no exercise 7.9; notebook 7 has 7.1, 7.2, 7.3, 7.4"),
])
def test_hint_and_solution_refuse_a_bad_exercise_number_in_one_line(bad, error, message):
    for fn in (sd.course.hint, sd.course.solution):
        with pytest.raises(error, match=re.escape(message)):
            fn(bad)


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION 1.1 hint: h\n# | a skeleton line first\nx = 1\n# END SOLUTION", "before any"),
    ("# HINT 1.1: a\n# BEGIN SOLUTION 1.1 hint: h\n# END SOLUTION", "outside the block"),
    ("# BEGIN SOLUTION 1.1 hint: h\n# HINT 1.2: a\n# HINT 1.1: b\n# END SOLUTION", "outside the block"),
    ("# BEGIN SOLUTION 1.1 hint: h\n# HINT: a\n# END SOLUTION", "malformed marker"),
])
def test_bad_hint_lines_are_reported(source, message):
    with pytest.raises(make_notebooks.NotebookError, match=message):
        blocks = make_notebooks.scan_blocks(source, "solutions/01_demo.ipynb, cell 3")[1]
        make_notebooks.exercise_help(blocks, "solutions/01_demo.ipynb")


def test_generator_writes_the_hints_and_solutions_file_of_each_notebook(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(synthetic_notebook(), tmp_path / "solutions" / "01_demo.ipynb")
    assert make_notebooks.main(["--root", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "sd" / "course" / "exercises" / "01_demo.json").read_text())
    assert written["exercises"]["1.1"] == {"stub": "add x to itself, or multiply by 2",
                                           "hints": ["the sum of x and x is twice x",
                                                     "add, keep the result, give it back",
                                                     "a skeleton:\n    y = ___\n    return y"],
                                           "solution": "y = x + x\nreturn y"}
    assert written["exercises"]["1.2"]["solution"] == "self.n = 0"


def test_an_exercise_in_two_blocks_gets_one_line_per_block_at_each_level():
    cell = ("class A:\n    def __init__(self):\n        # BEGIN SOLUTION 2.1 hint: make it\n"
            "        # HINT 2.1: one\n        # HINT 2.1: two\n        self.a = 1\n        # END SOLUTION\n\n"
            "    def forward(self, x):\n        # BEGIN SOLUTION 2.1 hint: use it\n        # HINT 2.1: three\n"
            "        # HINT 2.1: four\n        return x + self.a\n        # END SOLUTION")
    helped = make_notebooks.exercise_help(make_notebooks.scan_blocks(cell)[1], "demo")["2.1"]
    assert helped["hints"] == ["in __init__: one\nin forward: three", "in __init__: two\nin forward: four"]
    assert helped["solution"] == "# in __init__:\nself.a = 1\n\n# in forward:\nreturn x + self.a"
