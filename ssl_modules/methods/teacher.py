"""EMA teacher: a frozen copy of student modules, updated once per optimizer step."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ssl_modules.networks.backbones import Backbone, disable_stochastic_layers
from ssl_modules.methods._ranges import check_ranges
from ssl_modules.optimization.schedules import RunPlan, Schedule, cosine

__all__ = ["TeacherEMA", "EMAUpdate"]

EMAUpdate = Literal["after_step", "before_forward"]
"""When the teacher moves. ``"after_step"`` (DINO, CrIBo): right after optimizer step ``i`` with ``m[i]``.
``"before_forward"`` (BAM): at the start of iteration ``i``, before the teacher's forward, with ``m[i]``
(so the teacher of iteration ``i`` is made from the student after ``i`` steps with ``m[i]``)."""


class TeacherEMA:
    """Mixin for an :class:`~ssl_modules.SSLModule` with an exponential-moving-average teacher.

    Call :meth:`init_teacher` in ``__init__`` with the names of the student modules to copy (a method
    whose teacher is optional simply does not call it: :attr:`has_teacher` is then False). The teacher
    (:attr:`teacher`, a ``ModuleDict`` of the copies; :meth:`teacher_copy` gives one) never receives
    gradients, has its stochastic depth and dropout turned off (the papers build the teacher without them),
    and is saved in the checkpoint with the rest of the module. Its update,
    ``teacher = m * teacher + (1 - m) * student`` over the parameters, runs once per optimizer step (not
    per micro-batch of a gradient accumulation), at the point the method's ``update`` names. The momentum
    ``m`` is the schedule ``ema_momentum`` (declared here, applied and logged by the base class's schedule
    hook): a half-cosine from the initial momentum to 1 over the run, a closed form of the step, so a
    resumed run continues exactly. The embedding backbone of probes and exports is the teacher's backbone.
    """

    teacher: nn.ModuleDict

    def init_teacher(self, module_names: Sequence[str], momentum: float, update: EMAUpdate = "after_step") -> None:
        """Copy the student modules ``module_names`` into :attr:`teacher`; ``momentum`` is ``m`` at step 0."""
        check_ranges(type(self), [("ema_momentum", momentum, "in [0, 1]")])
        if update not in ("after_step", "before_forward"):
            raise ValueError(f"the teacher update must be 'after_step' or 'before_forward', got {update!r}")
        self._ema_start = momentum
        self._ema_update = update
        self._teacher_names = list(module_names)
        copies = {}
        for name in self._teacher_names:
            clone = copy.deepcopy(getattr(self, name))
            clone.requires_grad_(False)
            disable_stochastic_layers(clone)
            copies[name] = clone
        self.teacher = nn.ModuleDict(copies)

    # ------------------------------------------------------------------------------------------- the API
    @property
    def has_teacher(self) -> bool:
        return bool(getattr(self, "_teacher_names", None))

    def teacher_copy(self, name: str) -> nn.Module:
        """The teacher's copy of the student module ``name``."""
        if not self.has_teacher or name not in self.teacher:
            raise KeyError(f"{type(self).__name__} has no teacher copy of {name!r}")
        return self.teacher[name]

    @property
    def embedding_backbone(self) -> Backbone:
        """The teacher's backbone when the teacher copies ``backbone``, else the student's."""
        if self.has_teacher and "backbone" in self._teacher_names:
            return self.teacher_copy("backbone")
        return super().embedding_backbone

    def ema_momentum_schedule(self, plan: RunPlan) -> Schedule:
        """``m(step) = 1 - (1 - m0) * (1 + cos(pi * step / total_steps)) / 2`` (DINO's cosine to 1)."""
        start, total = self._ema_start, plan.total_steps
        return lambda step: cosine(step, total, start, 1.0)

    def declare_schedules(self, plan: RunPlan) -> dict[str, Schedule]:
        schedules = super().declare_schedules(plan)
        if self.has_teacher:
            schedules["ema_momentum"] = self.ema_momentum_schedule(plan)
        return schedules

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, in place, in one fused call."""
        teacher, student = [], []
        for name in self._teacher_names:
            pairs = zip(self.teacher[name].named_parameters(), getattr(self, name).named_parameters())
            for (t_name, t), (s_name, s) in pairs:
                assert t_name == s_name, f"teacher and student differ at {t_name} / {s_name}"
                teacher.append(t)
                student.append(s.detach().to(t.dtype))
        if teacher:
            torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    # ------------------------------------------------------------------------------------------- the hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # the schedule hook: ema_momentum of this step
        first_micro_batch = batch_idx % max(self.trainer.accumulate_grad_batches, 1) == 0
        if self.has_teacher and self._ema_update == "before_forward" and first_micro_batch:
            self.update_teacher(self.scheduled("ema_momentum"))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.has_teacher and self._ema_update == "after_step":
            self.update_teacher(self.scheduled("ema_momentum"))  # m[i] after step i
