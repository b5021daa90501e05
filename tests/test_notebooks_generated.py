"""notebooks/ is generated from solutions/ by tools/make_notebooks.py: it is up to date, and the stubbing is right."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
make_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_notebooks)

SOLVED_CELL = '''\
def double(x):
    """Twice x."""
    # BEGIN SOLUTION 1.1 hint: add x to itself, or multiply by 2
    y = x + x
    return y
    # END SOLUTION


class Counter:
    def __init__(self):
        # BEGIN SOLUTION 1.2 hint: start at "zero"
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
    assert '    """Twice x."""\n    # Exercise 1.1: your code here\n' \
           '    raise NotImplementedError("Exercise 1.1: add x to itself, or multiply by 2")' in stubbed
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
