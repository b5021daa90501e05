"""The environment settings the notebooks and the command line read ($SD_TRAIN_SECONDS, $SD_FULL_SIDE, ...).

One function per kind of value, each reading one variable: unset (or empty) gives the default; a value that does
not fit gives one line naming the variable, the value and what is expected, e.g.

    ValueError: $SD_TRAIN_SECONDS must be a number of seconds > 0, got 'ten'
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or not value.strip() else value.strip()


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
            what: str = "an integer") -> int:
    """$name as an integer in [minimum, maximum], or `default` when it is unset."""
    raw = _raw(name)
    if raw is None:
        return default
    bounds = _bounds(minimum, maximum)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be {what}{bounds}, got {raw!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"${name} must be {what}{bounds}, got {raw!r}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None, above: float | None = None,
              what: str = "a number") -> float:
    """$name as a finite number (>= minimum, or > above), or `default` when it is unset."""
    raw = _raw(name)
    if raw is None:
        return default
    bounds = f" > {above:g}" if above is not None else _bounds(minimum, None)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name} must be {what}{bounds}, got {raw!r}") from None
    if (not math.isfinite(value) or (minimum is not None and value < minimum)
            or (above is not None and value <= above)):
        raise ValueError(f"${name} must be {what}{bounds}, got {raw!r}")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """$name as a yes/no switch: 1/true/yes/on or 0/false/no/off (any case), or `default` when it is unset."""
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"${name} must be 1 or 0 (also true/false, yes/no, on/off), got {raw!r}")


def env_choice(name: str, choices: list[str] | tuple[str, ...], default: str | None = None) -> str | None:
    """$name as one of `choices`, or `default` when it is unset."""
    raw = _raw(name)
    if raw is None:
        return default
    if raw not in choices:
        raise ValueError(f"${name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def env_path(name: str, *, must_exist: bool = True) -> Path | None:
    """$name as a path (to an existing file or folder when must_exist), or None when it is unset."""
    raw = _raw(name)
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if must_exist and not path.exists():
        raise ValueError(f"${name} must be the path of an existing file or folder, got {raw!r} (not found)")
    return path


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
