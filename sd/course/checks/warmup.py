"""Check for notebook 00 (start here): a warm-up exercise that shows how exercises and checks work."""
from __future__ import annotations

import torch

from .common import Case, Mistake, check_function, randn, seeded

# exp() overflows float32 above ~88.7 and underflows to 0 below ~-103: inputs this far from 0 break a softmax
# that exponentiates the scores as they are (inf / inf, or 0 / 0: NaN either way).
LARGE_SCORE = 1000.0
# A row that the literal formula gets right (exp(80) fits in float32, exp(-500) is 0) but whose scores spread
# over hundreds: shifted by the row's mean (-216) its largest becomes exp(296) = inf.
WIDE_ROW = [[80.0, -500.0, -520.0, 75.0]]


def _softmax_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def _shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(x - shift) normalised over the last dimension: right for any shift, unless exp over- or underflows."""
    e = (x - shift).exp()
    return e / e.sum(-1, keepdim=True)


def check_softmax(fn) -> bool:
    """Exercise 0.1: fn(x) = exp(x) / sum(exp(x)) over the last dimension, finite for any finite float32 input."""
    with seeded():
        far_apart = randn(2, 5)
        far_apart[0] += LARGE_SCORE          # one row far above 0, the other far below
        far_apart[1] -= LARGE_SCORE
        cases = [Case({"x": randn(3, 5)}),
                 Case({"x": 4 * randn(2, 4, 7)}),
                 Case({"x": randn(2, 6) + LARGE_SCORE}),
                 Case({"x": far_apart}),
                 Case({"x": torch.tensor(WIDE_ROW)})]
    mistakes = [
        Mistake("exp overflows for large scores (exp(1000) = inf, and inf / inf is NaN) or underflows for very "
                "negative ones (0 / 0): the scores must be brought near 0 before exponentiating, without changing "
                "the result; what happens to the softmax when every score of a row moves by the same amount?",
                lambda ref, c: _shifted(c.inputs["x"], torch.zeros(()))),
        Mistake("the shift is the largest score of the whole tensor, not of each row: a row far below it "
                "underflows to 0 / 0; shift each row by its own maximum",
                lambda ref, c: _shifted(c.inputs["x"], c.inputs["x"].max())),
        Mistake("each row is shifted by its mean: right in exact arithmetic, but scores spread over hundreds still "
                "overflow (a row from -520 to 80 has its mean at -216, and exp(296) = inf); shift by the row's maximum, so the largest exponent is exp(0) = 1",
                lambda ref, c: _shifted(c.inputs["x"], c.inputs["x"].mean(-1, keepdim=True))),
        Mistake("the softmax runs over the first dimension: normalise over the last one, each row summing to 1",
                lambda ref, c: torch.softmax(c.inputs["x"], dim=0)),
        Mistake("the softmax runs over the second-to-last dimension: normalise over the last one, each row "
                "summing to 1", lambda ref, c: torch.softmax(c.inputs["x"], dim=-2)),
        Mistake("the sum runs over the whole tensor: divide each row by its own sum, so that each row sums to 1",
                lambda ref, c: (c.inputs["x"] - c.inputs["x"].max()).exp()
                / (c.inputs["x"] - c.inputs["x"].max()).exp().sum()),
    ]
    return check_function("check_softmax", fn, _softmax_reference, cases, mistakes, exercise="0.1",
                          reference_name="the reference softmax",
                          hint="each row of the output is exp of the row's scores divided by their sum: positive, "
                               "summing to 1, and finite whatever the size of the scores")
