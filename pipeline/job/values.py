"""Values read from the job file, each checked where it stands: a mapping with known keys, a number in its range,
a list, a choice, a path relative to the file; a mistake names its key (``prune.budgets[1]``).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserInputError


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _keys(section: Any, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    """The section as a mapping whose keys are all in ``allowed`` (else a UserInputError with a suggestion)."""
    if not isinstance(section, Mapping):
        raise UserInputError(f"config: '{where}' must be a mapping of keys ({', '.join(allowed)}), got "
                             f"{type(section).__name__}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserInputError(f"config: unknown key '{where}.{key}'{hint}; known keys: {', '.join(allowed)}")
    return section


def _number(value: Any, where: str, *, integer: bool = False, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserInputError(f"config: '{where}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise UserInputError(f"config: '{where}' must be a finite number, got {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        span = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise UserInputError(f"config: '{where}' must be in {span}, got {value!r}")
    return float(value) if not integer else value


def _list(value: Any, where: str) -> list[Any]:
    """A scalar or a list, as a non-empty list."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UserInputError(f"config: '{where}' is empty; give at least one value")
    return items


def _choice(value: Any, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserInputError(f"config: '{where}' is {value!r}; choose one of {', '.join(choices)}")
    return str(value)


def _path(value: Any, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise UserInputError(f"config: '{where}' must be a path, got {value!r}")
    path = Path(os.path.expanduser(value))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))
