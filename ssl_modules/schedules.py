"""Schedules as closed-form functions of the step, so that a resumed run continues exactly.

Nothing is stored: the optimizer step (``trainer.global_step``) and the run's length determine every value.
"""
from __future__ import annotations

import math

__all__ = ["cosine", "warmup_cosine", "linear_warmup", "StepSchedule"]


def cosine(step: float, total_steps: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped beyond)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: float, total_steps: float, warmup_steps: float, peak: float, end: float, start: float = 0.0
) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then a half-cosine to ``end``."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup(step: float, warmup_steps: float, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant at ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class StepSchedule:
    """The run's schedules in one place: learning rate (warm-up + cosine) and weight decay (cosine).

    Args:
        total_steps: optimizer steps of the whole run.
        warmup_steps: optimizer steps of the linear learning-rate warm-up.
        peak_lr: learning rate at the end of the warm-up.
        final_lr: learning rate at the last step.
        weight_decay: weight decay at step 0.
        final_weight_decay: weight decay at the last step (``None``: constant).
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        peak_lr: float,
        final_lr: float,
        weight_decay: float,
        final_weight_decay: float | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.peak_lr = peak_lr
        self.final_lr = final_lr
        self.weight_decay = weight_decay
        self.final_weight_decay = weight_decay if final_weight_decay is None else final_weight_decay

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr)

    def wd(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.final_weight_decay)
