"""Shared by the tests of `sd.course.checks`: assert a check rejects a wrong implementation and names the mistake,
and that a message never shows program text (the answer is only printed by solution())."""
import re

import pytest

# What marks program text in a message (words and maths such as "softmax(QKᵀ/√d)" or "exp(1000) = inf" are fine).
PROGRAM_TEXT = [
    (re.compile(r"\breturn\b|\bdef \w|\bimport \w|\blambda\b|\bfor \w+ in \w"), "a Python keyword"),
    (re.compile(r"\b(torch|F|nn|np|math|self|x|t|q|k|v)\.[A-Za-z_]\w*"), "a module or attribute access"),
    (re.compile(r"\w\)?\.[a-z_]\w*\("), "a method call"),
    (re.compile(r"\w\[[^\]]*[:,][^\]]*\]"), "indexing with a slice or several indices"),
    (re.compile(r"\b[a-z_]\w*=[^=\s]"), "a keyword argument"),
    (re.compile(r"\w\s*@\s*\w"), "a matrix product written as code ('@')"),
]


def program_text(message: str) -> str | None:
    """The first piece of program text in `message`, described, or None."""
    for pattern, what in PROGRAM_TEXT:
        found = pattern.search(message)
        if found:
            return f"{what}: {found.group(0)!r}"
    return None


def rejects(check, impl, *fragments: str) -> str:
    """Run check(impl), expect an AssertionError whose message contains every fragment; return the message."""
    with pytest.raises(AssertionError) as info:
        check(impl)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in the check's message:\n{message}"
    return message


def rejects_unrecognised(check, impl, exercise: str) -> str:
    """check(impl) fails on a wrong answer it does not know: the message says what differs, points to
    hint("N.M") and shows no program text. Returns the message."""
    message = rejects(check, impl, f'hint("{exercise}")', "not one of the mistakes this check knows")
    found = program_text(message)
    assert found is None, f"the check's message shows program text ({found}):\n{message}"
    return message
