"""Check for notebook 00 (start here): a warm-up exercise that shows how exercises and checks work."""
from __future__ import annotations

import torch

from .common import Case, Mistake, check_function, randn, seeded

# exp() overflows float32 above ~88.7: an input this large breaks a softmax that forgets to subtract the max.
LARGE_SCORE = 1000.0


def _softmax_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def check_softmax(fn) -> bool:
    """Exercise 0.1: fn(x) = exp(x) / sum(exp(x)) over the last dimension, stable for large x."""
    with seeded():
        cases = [Case({"x": randn(3, 5)}),
                 Case({"x": 4 * randn(2, 4, 7)}),
                 Case({"x": randn(2, 6) + LARGE_SCORE})]
    mistakes = [
        Mistake("exp overflows for large inputs (exp(1000) = inf, inf/inf = NaN): subtract each row's maximum "
                "first; softmax(x) = softmax(x - max(x)) mathematically",
                lambda ref, c: c.inputs["x"].exp() / c.inputs["x"].exp().sum(-1, keepdim=True)),
        Mistake("the softmax runs over the first dimension: normalise over the last one (dim=-1), "
                "each row summing to 1",
                lambda ref, c: torch.softmax(c.inputs["x"], dim=0)),
        Mistake("the softmax runs over dim -2: normalise over the last dimension (dim=-1)",
                lambda ref, c: torch.softmax(c.inputs["x"], dim=-2)),
        Mistake("the sum runs over the whole tensor: sum over the last dimension only, with keepdim=True",
                lambda ref, c: (c.inputs["x"] - c.inputs["x"].max()).exp()
                / (c.inputs["x"] - c.inputs["x"].max()).exp().sum()),
    ]
    return check_function("check_softmax", fn, _softmax_reference, cases, mistakes,
                          reference_name="torch.softmax(x, dim=-1)",
                          hint="e = (x - x.max(dim=-1, keepdim=True).values).exp(); "
                               "return e / e.sum(dim=-1, keepdim=True)")
