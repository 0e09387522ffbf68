"""Schedules as closed-form functions of the optimizer step, so that a resumed run continues exactly.

Nothing is stored: the optimizer step (``trainer.global_step``) and the run's length (:class:`RunPlan`)
determine every value. Each method declares its schedules in one place
(:meth:`ssl_modules.SSLModule.declare_schedules`); one hook applies and logs them. See ``docs/schedules.md``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["RunPlan", "Schedule", "WarmupFormula", "cosine", "warmup_cosine", "linspace_ramp"]

Schedule = Callable[[int], float]
"""A schedule: optimizer step (0-based) -> value."""

WarmupFormula = Literal["linspace", "fraction"]
"""``"linspace"``: ``numpy.linspace(start, peak, W)``, ``start + (peak - start) * i / (W - 1)``, the peak reached at
step ``W - 1`` (DINO, CrIBo, BAM). ``"fraction"``: ``start + (peak - start) * i / W``, the peak reached at step ``W``
(VICRegL)."""


@dataclass(frozen=True)
class RunPlan:
    """The length of a run in optimizer steps, what every schedule is a function of.

    Args:
        total_steps: optimizer steps of the whole run (Lightning's estimate: ``min(max_steps, max_epochs *
            steps_per_epoch)``).
        steps_per_epoch: optimizer steps per epoch, from the real number of training batches per epoch
            (``ceil(num_training_batches / accumulate_grad_batches)``), whether or not ``max_steps`` binds.
        global_batch_size: images per optimizer step over all processes (for the linear LR scaling).
    """

    total_steps: int
    steps_per_epoch: int
    global_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.steps_per_epoch < 1 or self.global_batch_size < 1:
            raise ValueError(f"a RunPlan needs total_steps, steps_per_epoch and global_batch_size >= 1, got {self}")

    @property
    def epochs(self) -> int:
        """Epochs the run starts, the last one possibly partial (``ceil(total_steps / steps_per_epoch)``)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch(self, step: int) -> int:
        """The (0-based) epoch of optimizer step ``step``."""
        return step // self.steps_per_epoch

    def steps(self, epochs: float) -> int:
        """Epochs (fractions allowed) in optimizer steps."""
        return round(epochs * self.steps_per_epoch)


def cosine(step: float, total_steps: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped beyond)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: float,
    total_steps: float,
    warmup_steps: int,
    peak: float,
    end: float,
    start: float = 0.0,
    formula: WarmupFormula = "fraction",
) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps`` steps (``formula``: see
    :data:`WarmupFormula`), then a half-cosine from ``peak`` at step ``warmup_steps`` to ``end`` at
    ``total_steps``."""
    if step < warmup_steps:
        if formula == "linspace":
            return start if warmup_steps == 1 else start + (peak - start) * step / (warmup_steps - 1)
        if formula == "fraction":
            return start + (peak - start) * step / warmup_steps
        raise ValueError(f"warm-up formula must be 'linspace' or 'fraction', got {formula!r}")
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linspace_ramp(index: int, start: float, end: float, length: int) -> float:
    """``numpy.linspace(start, end, length)[index]``, then ``end`` from ``index = length`` on.

    The per-epoch ramps of CrIBo's teacher temperatures and BAM's Sinkhorn temperature: the final value is
    reached at ``index = length - 1``; a ramp of length 1 gives ``start`` at index 0, of length 0 ``end``.
    """
    if index >= length:
        return end
    return start if length == 1 else start + (end - start) * index / (length - 1)
