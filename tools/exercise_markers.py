"""The marker lines of an exercise in a solved notebook, and what the generator makes of them.

    # BEGIN SOLUTION 7.4 hint: <the stub's sentence: what to compute, in words, no code>
    # HINT 7.4: <the key insight, or where it comes from (section, equation)>
    # HINT 7.4: <the plan: the steps and the shapes, in words or pseudo-code>
    # HINT 7.4: <a skeleton with blanks (___) that does not run as it is; its lines follow as "# |" lines>
    # |     x = ___             # (B, C, H, W)
    <the solution's code>
    # END SOLUTION

No hint may contain the solution's code: `help_problems` lists every hint that repeats a line of it.

`scan_blocks` turns a cell's source into the learner's (a NotImplementedError stub per block) and the blocks;
`exercise_help` gathers, per exercise number, the stub's sentence, the hint levels and the solution code that
tools/make_notebooks.py writes to sd/course/exercises/NN_topic.json for `sd.course.hint` and `sd.course.solution`.
"""
from __future__ import annotations

import json
import re
import textwrap

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION (?P<number>\d+\.\d+) hint: (?P<hint>\S.*?)\s*$")
HINT = re.compile(r"^[ \t]*# HINT (?P<number>\d+\.\d+): (?P<hint>\S.*?)\s*$")
# A further line of the hint above it (a skeleton's code): "# | <text>", kept with its indentation after "| ".
HINT_MORE = re.compile(r"^[ \t]*# \|(?: (?P<text>.*))?$")
END = re.compile(r"^[ \t]*# END SOLUTION\s*$")
ANY_MARKER = re.compile(r"^[ \t]*#\s*((BEGIN|END)\s+SOLUTION|HINT\b)")
# Every exercise offers at least this many levels of help beyond the stub's sentence (hint() walks them):
# the key insight, the plan, a skeleton with blanks; then solution() prints the code.
MIN_HINT_LEVELS = 3
# A skeleton's blanks: the last hint must have at least one, so that it cannot run as it is.
BLANK = "___"
# A line of the solution this long (code without comments and spaces) counts as its code when a hint repeats it.
LEAK_MIN_CHARS = 12
# The stub's sentence says what to compute in words: none of these (code) may appear in it.
CODE_IN_WORDS = [
    (re.compile(r"="), "an assignment or comparison ('=')"),
    (re.compile(r"[A-Za-z_]\w*\("), "a call ('name(')"),
    (re.compile(r"\["), "indexing ('[')"),
    (re.compile(r"\.[A-Za-z_]"), "an attribute or method ('.name')"),
    (re.compile(r"\btorch\b|\bF\b|\bnn\b"), "a library name (torch, F, nn)"),
]


class NotebookError(ValueError):
    """A solutions notebook the generator cannot turn into an exercise (bad markers, bad name)."""


def code_in_words(text: str) -> str | None:
    """What makes `text` read as code rather than words (see CODE_IN_WORDS), or None."""
    return next((what for pattern, what in CODE_IN_WORDS if pattern.search(text)), None)


def scan_blocks(source: str, where: str = "cell") -> tuple[str, list[dict]]:
    """The source with each BEGIN/END SOLUTION block replaced by a NotImplementedError stub, and the blocks.

    Each block is a dict: number, stub (the BEGIN line's sentence), hints (its HINT lines, in order), code (the
    solution's lines without the markers, dedented) and part (the def the block sits in, e.g. "forward").
    """
    out, blocks, block, part = [], [], None, ""
    for lineno, line in enumerate(source.split("\n"), start=1):
        begin, hint, end = BEGIN.match(line), HINT.match(line), END.match(line)
        more = HINT_MORE.match(line) if block is not None else None
        definition = re.match(r"^[ \t]*def (\w+)\(", line)
        if definition and block is None:
            part = definition.group(1)
        if begin:
            if block is not None:
                raise NotebookError(f"{where}, line {lineno}: BEGIN SOLUTION inside the block opened on line "
                                    f"{block['line']}; close it with '# END SOLUTION' first")
            block = {"line": lineno, "number": begin["number"], "stub": begin["hint"], "hints": [], "code": [],
                     "part": part}
            problem = code_in_words(block["stub"])
            if problem:
                raise NotebookError(f"{where}, line {lineno}: the stub's sentence of exercise {block['number']} "
                                    f"contains {problem}; say in words what to compute and put code in a "
                                    f"'# HINT {block['number']}: ...' line")
            indent, message = begin["indent"], f"Exercise {block['number']}: {block['stub']}"
            out.append(f"{indent}# Exercise {block['number']}: your code here (more help: hint(\"{block['number']}\"); "
                       f"the answer: solution(\"{block['number']}\"))")
            # json.dumps gives a valid double-quoted Python string literal
            out.append(f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})")
        elif hint:
            if block is None or hint["number"] != block["number"]:
                raise NotebookError(f"{where}, line {lineno}: '# HINT {hint['number']}:' outside the block of "
                                    f"exercise {hint['number']}; put it between its BEGIN and END lines")
            block["hints"].append(hint["hint"])
        elif more:
            if not block["hints"]:
                raise NotebookError(f"{where}, line {lineno}: a '# |' line before any '# HINT {block['number']}:' "
                                    "line; it continues the hint above it")
            block["hints"][-1] += "\n" + (more["text"] or "")
        elif end:
            if block is None:
                raise NotebookError(f"{where}, line {lineno}: END SOLUTION without a BEGIN SOLUTION before it")
            block["code"] = textwrap.dedent("\n".join(block["code"])).strip("\n")
            blocks.append(block)
            block = None
        elif ANY_MARKER.match(line):
            raise NotebookError(f"{where}, line {lineno}: malformed marker {line.strip()!r}; expected "
                                "'# BEGIN SOLUTION <N.M> hint: <text>', '# HINT <N.M>: <text>' or '# END SOLUTION'")
        elif block is None:
            out.append(line)
        else:
            block["code"].append(line)
    if block is not None:
        raise NotebookError(f"{where}: BEGIN SOLUTION {block['number']} on line {block['line']} is never closed "
                            "with '# END SOLUTION'")
    return "\n".join(out), blocks


def stub_source(source: str, where: str = "cell") -> tuple[str, list[str]]:
    """Replace each BEGIN/END SOLUTION block by a NotImplementedError stub; return (new source, exercise numbers)."""
    stubbed, blocks = scan_blocks(source, where)
    return stubbed, [block["number"] for block in blocks]


def exercise_help(blocks: list[dict], where: str) -> dict[str, dict]:
    """Per exercise number: the stub's sentence, the hint levels and the solution code, from its blocks.

    An exercise written in two blocks (a constructor and a forward) gets, at each level, one line per block.
    """
    exercises: dict[str, list[dict]] = {}
    for block in blocks:
        exercises.setdefault(block["number"], []).append(block)
    found = {}
    for number, parts in exercises.items():
        def label(part, text):
            return f"in {part['part']}: {text}" if len(parts) > 1 and part["part"] else text

        levels = max(len(part["hints"]) for part in parts)
        found[number] = {
            "stub": "\n".join(label(part, part["stub"]) for part in parts),
            "hints": ["\n".join(label(part, part["hints"][level]) for part in parts if level < len(part["hints"]))
                      for level in range(levels)],
            "solution": "\n\n".join((f"# in {part['part']}:\n" if len(parts) > 1 and part["part"] else "")
                                     + part["code"] for part in parts),
        }
    return found


def _code_lines(code: str) -> set[str]:
    """The solution's lines as code to compare: comments dropped, spaces removed, long enough to mean something."""
    lines = set()
    for line in code.split("\n"):
        line = re.sub(r"\s+", "", line.split("#", 1)[0])
        if len(line) >= LEAK_MIN_CHARS:
            lines.add(line)
    return lines


def help_problems(number: str, help_: dict) -> list[str]:
    """What breaks the rules of staged help in one exercise (empty when nothing does).

    At least MIN_HINT_LEVELS hints; the last is a skeleton with a blank (it cannot run as it is); no hint repeats a
    line of the solution's code (comments and spaces aside); the stub's sentence is words, not code.
    """
    found = []
    hints = help_["hints"]
    if len(hints) < MIN_HINT_LEVELS:
        found.append(f"exercise {number} has {len(hints)} hints, expected at least {MIN_HINT_LEVELS} "
                     "(the insight, the plan, a skeleton with blanks)")
    elif BLANK not in hints[-1]:
        found.append(f"exercise {number}: the last hint is not a skeleton with blanks ({BLANK!r})")
    solution_lines = _code_lines(help_["solution"])
    for level, text in enumerate(hints, start=1):
        for line in text.split("\n"):
            compact = re.sub(r"\s+", "", line.split("#", 1)[0])
            # a line of the solution, or a whole statement of it inside a hint's sentence
            leaked = [code for code in solution_lines if code == compact or (len(code) >= 2 * LEAK_MIN_CHARS
                                                                             and code in compact)]
            if leaked:
                found.append(f"exercise {number}, hint {level} repeats the solution's code: {leaked[0]!r}")
    problem = code_in_words(help_["stub"].replace("\n", " "))
    if problem:
        found.append(f"exercise {number}: the stub's sentence contains {problem}")
    return found
