"""Help with an exercise, one level at a time: `hint("7.4")` gives the next hint, `solution("7.4")` the answer.

A stub says in words what to compute; the check names a mistake when it sees one; `hint` goes further each time
it is called: the key insight, then the plan, then a skeleton with blanks; `solution` prints the solution's code,
only when asked. No hint contains the solution's code. The levels are written once, as marker lines in the solved
notebook (solutions/NN_topic.ipynb):

    # BEGIN SOLUTION 7.4 hint: <the stub's sentence: what to compute, in words>
    # HINT 7.4: <the key insight, or where it comes from>
    # HINT 7.4: <the plan: steps and shapes, in words or pseudo-code>
    # HINT 7.4: <a skeleton with blanks ___, its code on the "# |" lines below>
    # |     <a line of the skeleton>
    <the solution's code>
    # END SOLUTION

and tools/make_notebooks.py collects them into sd/course/exercises/NN_topic.json, which this module reads
(offline: the files ship in the package).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

# "7.4": notebook 7, exercise 4
EXERCISE_NUMBER = re.compile(r"^(\d+)\.(\d+)$")
# The generated files, inside this package: exercises/NN_topic.json
EXERCISES_FOLDER = "exercises"
# Their names: NN_topic.json, or NNb_topic.json for a notebook between NN and NN+1.
NOTEBOOK_FILE = re.compile(r"^\d\d_[a-z0-9_]+\.json$")

# What each level of help is, in the order hint() shows them (an exercise with more hints repeats "more").
LEVEL_NAMES = ["the key insight", "the plan", "a skeleton to fill in"]
# How many hints of each exercise have been shown in this session (the next call shows the next one).
_shown: dict[str, int] = {}


def hint(exercise: str) -> None:
    """Print the next hint of `exercise` ("7.4"): the key insight, then the plan, then a skeleton with blanks."""
    number, help_ = _exercise(exercise, "hint")
    levels = help_["hints"]
    level = _shown.get(number, 0)
    if level >= len(levels):
        print(f"Exercise {number} has no more hints ({len(levels)} shown). The last one:\n{_indent(levels[-1])}\n"
              f'The answer: solution("{number}").')
        return
    _shown[number] = level + 1
    more = (f'hint("{number}") again for the next' if level + 1 < len(levels)
            else f'the last hint; solution("{number}") prints the answer')
    name = _level_name(level, len(levels))
    print(f"Hint {level + 1} of {len(levels)} for exercise {number}, {name} ({more}):\n{_indent(levels[level])}")


def solution(exercise: str) -> None:
    """Print the solution's code of `exercise` ("7.4"), to read or to paste into the exercise cell."""
    number, help_ = _exercise(exercise, "solution")
    print(f"Solution of exercise {number} (the code between the exercise cell's lines; mind the indentation):\n\n"
          f"{help_['solution']}")


def hint_levels(exercise: str) -> list[str]:
    """Every hint of `exercise`, in the order `hint` shows them (for tools and tests)."""
    return list(_exercise(exercise, "hint_levels")[1]["hints"])


def reset_hints() -> None:
    """Start every exercise's hints again from the first."""
    _shown.clear()


def _exercise(exercise: str, caller: str) -> tuple[str, dict]:
    """(number, its help) for "7.4", or a one-line TypeError/ValueError."""
    if not isinstance(exercise, str):
        raise TypeError(f'{caller}() expects the exercise number as a string such as "7.4", '
                        f"got {type(exercise).__name__} {exercise!r}")
    number = exercise.strip()
    match = EXERCISE_NUMBER.match(number)
    if not match:
        raise ValueError(f'{caller}() expects an exercise number such as "7.4" (notebook.exercise), got {exercise!r}')
    exercises = _notebook_exercises(int(match.group(1)))
    if number not in exercises:
        known = ", ".join(sorted(exercises, key=lambda n: int(n.split(".")[1]))) or "none"
        raise ValueError(f"{caller}(): there is no exercise {number}; notebook {match.group(1)} has {known}")
    return number, exercises[number]


@lru_cache(maxsize=None)
def _notebook_exercises(notebook: int) -> dict[str, dict]:
    """The exercises of notebook `notebook` from its generated files (empty when it has none)."""
    folder = resources.files(__package__) / EXERCISES_FOLDER
    exercises: dict[str, dict] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if NOTEBOOK_FILE.match(entry.name) and int(entry.name[:2]) == notebook:
            exercises.update(json.loads(entry.read_text(encoding="utf-8"))["exercises"])
    return exercises


def _level_name(level: int, count: int) -> str:
    """What hint number `level` (from 0) of `count` is: the insight first, the skeleton last."""
    if level == count - 1:
        return LEVEL_NAMES[-1]
    return LEVEL_NAMES[level] if level < len(LEVEL_NAMES) - 1 else "a further step"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))
