"""Input checks shared by the methods' functional cores (each public function validates in one call)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_bool_mask"]


def check_bool_mask(mask: Tensor | None, shape: tuple[int, ...], name: str, meaning: str) -> None:
    """A ``ValueError`` unless ``mask`` is None or a bool tensor of ``shape``; ``meaning`` says what it marks."""
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != shape):
        raise ValueError(
            f"{name} must be a bool tensor of shape {shape} ({meaning}), got {mask.dtype} {tuple(mask.shape)}"
        )
