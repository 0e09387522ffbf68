"""EMA teacher: a frozen copy of the student, updated once per optimizer step."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..backbones import disable_stochastic_layers
from ..schedules import cosine

__all__ = ["TeacherEMA"]


class TeacherEMA:
    """Mixin for an :class:`~ssl_modules.SSLModule` with an exponential-moving-average teacher.

    Call :meth:`init_teacher` in ``__init__`` with the names of the student modules to copy (a method
    whose teacher is optional simply does not call it: ``has_teacher`` is then False). The teacher
    (``self.teacher``, a ``ModuleDict`` of the copies) never receives gradients, has its stochastic depth
    and dropout turned off (the papers build the teacher without them), is saved in the checkpoint with
    the rest of the module, and is updated right after every optimizer step — so micro-batches of a
    gradient accumulation do not update it — with ``teacher = m * teacher + (1 - m) * student`` over the
    parameters. The momentum ``m`` follows a half-cosine from ``ema_momentum`` to 1 over the run, a closed
    form of the step, so a resumed run continues exactly.
    """

    teacher: nn.ModuleDict
    ema_momentum: float

    def init_teacher(self, module_names: Sequence[str], momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"the EMA momentum must lie in [0, 1], got {momentum}")
        self.ema_momentum = momentum
        self._teacher_names = list(module_names)
        copies = {}
        for name in self._teacher_names:
            student = getattr(self, name)
            clone = copy.deepcopy(student)
            clone.requires_grad_(False)
            disable_stochastic_layers(clone)
            copies[name] = clone
        self.teacher = nn.ModuleDict(copies)

    def teacher_momentum(self, step: int) -> float:
        """Momentum of the update that follows optimizer step ``step`` (0-based)."""
        return cosine(step, self.total_steps, self.ema_momentum, 1.0)

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher, student = [], []
        for name in self._teacher_names:
            for (t_name, t), (s_name, s) in zip(
                self.teacher[name].named_parameters(), getattr(self, name).named_parameters()
            ):
                assert t_name == s_name, f"teacher and student differ at {t_name} / {s_name}"
                teacher.append(t)
                student.append(s.detach())
        return teacher, student

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, in place, in one fused call."""
        teacher, student = self._ema_pairs()
        if teacher:
            torch._foreach_lerp_(teacher, [s.to(t.dtype) for t, s in zip(teacher, student)], 1.0 - momentum)

    @property
    def has_teacher(self) -> bool:
        return bool(getattr(self, "_teacher_names", None))

    def optimizer_step(self, *args, **kwargs) -> None:
        step = self.trainer.global_step
        super().optimizer_step(*args, **kwargs)
        if self.has_teacher:
            self.update_teacher(self.teacher_momentum(step))
