"""The one place where ``ssl_modules.functional`` handles precision (docs/performance.md).

Every public function of the package is wrapped by :func:`full_precision`: its floating tensor arguments
(also inside lists and tuples) arrive in at least float32 (float64 stays float64) and its body runs with
autocast off, so under ``16-mixed``/``bf16-mixed`` training the matmuls, softmaxes, Sinkhorn and clustering
of the methods run in float32 whatever the callers pass. The cast is differentiable: gradients reach
half-precision inputs in their own dtype. Callers (the LightningModules) pass their tensors as they are.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["full_precision", "at_least_float32"]

F = TypeVar("F", bound=Callable[..., Any])


def at_least_float32(value: Any) -> Any:
    """Half-precision floating tensors -> float32, recursively through lists and tuples; the rest unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(at_least_float32(v) for v in value)
    return value


def _first_tensor(values: Any) -> Tensor | None:
    for value in values:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` with autocast off on its tensors' device and every floating input at least float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = _first_tensor([*args, *kwargs.values()])
        context = _autocast_off(first.device.type) if first is not None else contextlib.nullcontext()
        with context:
            return fn(*at_least_float32(args), **{k: at_least_float32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
