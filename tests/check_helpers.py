"""Shared by the tests of `sd.course.checks`: assert a check rejects a wrong implementation and names the mistake."""
import pytest


def rejects(check, impl, *fragments: str) -> str:
    """Run check(impl), expect an AssertionError whose message contains every fragment; return the message."""
    with pytest.raises(AssertionError) as info:
        check(impl)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in the check's message:\n{message}"
    return message
