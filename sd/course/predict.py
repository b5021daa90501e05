"""Predict, then run: a question asked before the cell that shows the answer.

    predict("Without the 1/sqrt(d) scale, the softmax over 64-dimensional scores becomes ...",
            ["flatter", "peakier, close to one-hot", "the same"],
            answer=1, why="the dot products of d random components grow like sqrt(d); ...")

In Jupyter (or Colab) it shows the choices as buttons; after a choice it says whether the prediction held, and why.
Without a widget front end (a plain terminal, nbval in CI) it prints the question and the numbered choices only:
decide, then run the next cell, whose output and text give the answer. The answer is never printed there.
"""
from __future__ import annotations

from typing import Sequence

try:   # ipywidgets is in the course extra; without it, the plain-text question
    import ipywidgets as widgets
    from IPython import get_ipython
    from IPython.display import display
except ImportError:   # pragma: no cover - the course extra installs it
    widgets = None


def predict(question: str, choices: Sequence[str], answer: int, why: str) -> None:
    """Ask `question` with `choices`; `answer` is the index of the right one, `why` the reason shown after a choice."""
    if not isinstance(question, str) or not question.strip():
        raise TypeError(f"predict() expects the question as a non-empty string, got {question!r}")
    if isinstance(choices, str) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"predict() expects at least two choices, each a string, got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"predict(): answer must be the index of the right choice, 0 to {len(choices) - 1}, "
                         f"got {answer!r}")
    lines = [f"🤔 Predict before you run the next cell: {question}"]
    lines += [f"   ({chr(ord('a') + i)}) {choice}" for i, choice in enumerate(choices)]
    print("\n".join(lines))
    if widgets is None or get_ipython() is None or not hasattr(get_ipython(), "kernel"):
        print("   Decide, then run the next cell: its output and the text below it give the answer.")
        return
    buttons = widgets.ToggleButtons(options=[chr(ord("a") + i) for i in range(len(choices))], value=None,
                                    description="Your guess:")
    verdict = widgets.Output()

    def on_choice(change):
        verdict.clear_output()
        with verdict:
            chosen = ord(change["new"]) - ord("a")
            mark = "✅ right" if chosen == answer else f"❌ not quite: it is ({chr(ord('a') + answer)})"
            print(f"{mark}. {why}")

    buttons.observe(on_choice, names="value")
    display(widgets.VBox([buttons, verdict]))
