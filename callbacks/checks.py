"""Argument checks shared by the probes: one message format for every probe."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["require_choice", "require_at_least", "require_positive", "require_fraction"]


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r}; use one of {', '.join(repr(c) for c in choices)}")


def require_at_least(minimum: int, **values: int | None) -> None:
    """Every given integer is at least ``minimum`` (``None`` values are skipped: they mean "no cap")."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}")


def require_positive(**values: float) -> None:
    """Every given number is > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value} must be > 0")


def require_fraction(name: str, value: float) -> None:
    """``value`` lies in (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} must lie in (0, 1]")
