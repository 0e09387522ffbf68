"""Range checks of hyper-parameters at construction: a bad value fails before any model is built.

Each check names the argument, the value, the valid range and the method's default (its paper/official value),
read from the signature of the class being built, so a message always quotes the default of that class.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["RULES", "check_ranges"]

RULES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}
"""The valid ranges by name: ``rule -> predicate``."""


def _default(owner: type, name: str) -> Any:
    """The default of argument ``name`` in the first ``__init__`` of ``owner``'s MRO that declares one."""
    for cls in owner.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        parameter = inspect.signature(init).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return inspect.Parameter.empty


def check_ranges(owner: type, checks: Iterable[tuple[str, Any, str]]) -> None:
    """Raise one ``ValueError`` listing every ``(name, value, rule)`` whose value breaks its rule.

    ``None`` values are skipped (optional arguments left unset); sequences are checked element by element
    (``betas``); non-finite numbers always fail. ``rule`` is a key of :data:`RULES`.
    """
    problems = []
    for name, value, rule in checks:
        if value is None:
            continue
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and RULES[rule](v)
                 for v in values)
        if not ok:
            default = _default(owner, name)
            hint = "" if default is inspect.Parameter.empty else f" ({owner.__name__}'s default: {default!r})"
            problems.append(f"{name}={value!r} must be {rule}{hint}")
    if problems:
        raise ValueError(f"{owner.__name__}: " + "; ".join(problems))
