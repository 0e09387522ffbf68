"""Checks shared by the protocols and the probes: argument checks with one message format, and the data-set
check that fails before any work (a clear error now rather than after minutes of feature extraction)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.utils.data import Dataset

__all__ = ["EvalDataError", "check_dataset", "require_choice", "require_at_least", "require_positive",
           "require_fraction"]


class EvalDataError(ValueError):
    """An evaluation data set is missing, empty or unreadable; the message names the path and the layout."""


def check_dataset(dataset: Dataset, what: str) -> None:
    """An ``EvalDataError`` naming ``what`` unless the set is not empty, its first item reads and (image-mask
    pairs) every mask has its image's size (read from the file headers)."""
    if len(dataset) == 0:
        raise EvalDataError(f"{what} is empty")
    try:
        dataset[0]
        check_sizes = getattr(dataset, "check_mask_sizes", None)
        if check_sizes is not None:
            check_sizes()
    except EvalDataError:
        raise
    except Exception as error:  # noqa: BLE001  (any decoding failure is reported with the set's name)
        raise EvalDataError(f"{what}: {error}") from error


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
