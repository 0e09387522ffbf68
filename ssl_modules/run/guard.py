"""Non-finite guard: a NaN or Inf loss stops the run within a few steps, and is never checkpointed or exported.

Every ``SSLModule`` attaches a :class:`NonFiniteGuard` (``SSLModule(nonfinite_guard=False)`` turns it off).
Each step the guard folds the terms that went through ``SSLModule.log_terms`` into a flag that stays on the
device (no host synchronisation per step); the host reads the flag every ``check_every_n_steps`` steps (the
Trainer's ``log_every_n_steps`` by default), at the end of every epoch and of training, and before every
checkpoint is written, where the weights are checked too. A non-finite value raises
:class:`NonFiniteLossError`, which names the first non-finite step and terms; the newest checkpoint on disk
is then the last finite one. See ``docs/failures.md``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ssl_modules.checkpoints.export import non_finite_weights
from ssl_modules.run import distributed

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "check_finite_state"]

_NEVER = torch.iinfo(torch.long).max


class NonFiniteLossError(RuntimeError):
    """A loss term or the weights became NaN/Inf; training stopped before writing anything from that point."""


class NonFiniteGuard(Callback):
    """Stop training at the first NaN/Inf loss term (see the module docstring).

    Args:
        check_every_n_steps: host check interval in optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps``.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or None, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        self._last_checked = -1

    # ----------------------------------------------------------------------------------- recording
    def record(self, terms: Mapping[str, Tensor | float], step: int, device: torch.device) -> None:
        """Fold one step's terms into the device-side record of the first non-finite step of each term."""
        if not terms:
            return
        names = tuple(terms)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                              for v in terms.values()])
        first, value = self._first_bad.get(names) or (
            torch.full((len(names),), _NEVER, dtype=torch.long, device=device), torch.zeros_like(values))
        new = ~torch.isfinite(values) & (first == _NEVER)
        self._first_bad[names] = (torch.where(new, step, first), torch.where(new, values, value))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logged = getattr(pl_module, "logged_terms", None)
        if logged:
            step, terms = logged
            self.record(terms, step, pl_module.device)
            pl_module.logged_terms = None
        every = self.check_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        step = trainer.global_step
        if step % every == 0 and step != self._last_checked:
            self._last_checked = step
            self.check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs inside ``Trainer.save_checkpoint`` on every process before the file is written: raising
        # here keeps a checkpoint of a broken run off the disk.
        self.check(trainer)
        check_finite_state(pl_module, f"the checkpoint at step {trainer.global_step} was not written")

    # -------------------------------------------------------------------------------------- check
    def check(self, trainer: Trainer) -> None:
        """Read the device flags (one small all-reduce under DDP) and raise if any term was non-finite."""
        if not self._first_bad:
            found = torch.tensor(_NEVER, dtype=torch.long, device=trainer.strategy.root_device)
        else:
            found = torch.stack([first.min() for first, _ in self._first_bad.values()]).min()
        first_step = int(distributed.all_reduce(found, op="min").item())
        if first_step == _NEVER:
            return
        raise NonFiniteLossError(self.describe(first_step, trainer.global_step))

    def describe(self, first_step: int, now: int) -> str:
        """The message: first non-finite step, the terms with their values, and what to do."""
        bad = []
        for names, (first, value) in self._first_bad.items():
            for name, s, v in zip(names, first.tolist(), value.tolist()):
                if s == first_step:
                    bad.append(f"{name}={v}")
        where = ", ".join(bad) if bad else "the loss on another process"
        return (
            f"non-finite loss at step {first_step}: {where} (detected at step {now}). Training stopped; no "
            "checkpoint or export was written after that step, so the newest checkpoint is the last finite one. "
            "Usual causes: a learning rate too high for the batch size (lower lr, add warmup_epochs or clip_grad), "
            "a temperature near 0, or broken input images. To train on regardless, pass "
            "--model.init_args.nonfinite_guard false (SSLModule(nonfinite_guard=False))."
        )


def check_finite_state(module: torch.nn.Module, consequence: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the first parameters or buffers that hold NaN/Inf."""
    bad = non_finite_weights(dict([*module.named_parameters(), *module.named_buffers()]))
    if bad:
        raise NonFiniteLossError(f"non-finite weights ({bad}): {consequence}")
