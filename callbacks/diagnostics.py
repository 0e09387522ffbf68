"""Pictures in TensorBoard: ``VisualDiagnostics`` (what the method does) and the probes' predicted masks."""
from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ssl_modules.run.optional_parts import isolated_rng
from ssl_modules.run.sharding import gathered, sharded_units
from ssl_modules.drawing import segmentation_comparison, tile

__all__ = ["VisualDiagnostics", "tensorboard_writer", "log_segmentation_examples"]

log = logging.getLogger(__name__)


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None`` without one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_segmentation_examples(trainer: pl.Trainer, tag: str, images: Tensor, masks: Tensor, predictions: Tensor,
                              num_classes: int, count: int = 4) -> None:
    """One picture of ``count`` rows (image | ground truth | prediction) under ``tag``, if TensorBoard logs."""
    writer = tensorboard_writer(trainer)
    if writer is None or count < 1:
        return
    rows = [segmentation_comparison(images[i], masks[i], predictions[i], num_classes)
            for i in range(min(count, images.shape[0]))]
    writer.add_image(tag, tile(rows, nrow=1), global_step=trainer.global_step)


class VisualDiagnostics(Callback):
    """Log ``pl_module.visual_diagnostics(batch)`` to TensorBoard every ``every_n_steps`` optimizer steps.

    The module returns ``{name: float image (3, H, W) in [0, 1]}`` for a training batch (CrIBo's object
    clusters over the crops, VICRegL's matched cells, BAM's attention and Sinkhorn targets); each picture is
    added as ``<prefix><name>`` at the current global step. Runs on the global rank 0 process only (so
    ``visual_diagnostics`` must issue no collective; under FSDP2 every process first gathers the sharded
    parameters, ``docs/fsdp2.md``), before the batch's training step, and only when the
    trainer has a ``TensorBoardLogger`` (a warning says so once otherwise). Each picture carries its own
    caption (what the rows, columns and colours are). Drawing runs on the global random generators
    without changing them: a run with pictures trains exactly as the run without them, and resumes exactly.

    Pictures are optional: if drawing fails (an exception in ``visual_diagnostics`` or a picture that is not
    ``(3, H, W)``), the error is reported once, the callback disables itself, training goes on, and the
    message is kept in ``failures`` (empty when all went well) for the end-of-run summary.

    Args:
        every_n_steps: log when the number of optimizer steps done is a multiple of this (step 0 included).
        prefix: prefix of the TensorBoard tags.
    """

    def __init__(self, every_n_steps: int = 500, prefix: str = "diagnostics/") -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps, self.prefix = every_n_steps, prefix
        self._last_step: int | None = None
        self._gathered_step: int | None = None  # under FSDP2 (draw_gathered)
        self.failures: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "visual_diagnostics", None)):
            raise TypeError(f"VisualDiagnostics needs `pl_module.visual_diagnostics(batch) -> dict[str, Tensor]`; "
                            f"{type(pl_module).__name__} has none (subclass ssl_modules.SSLModule)")
        if tensorboard_writer(trainer) is None:
            rank_zero_warn("VisualDiagnostics logs pictures to TensorBoard only, and the trainer has no "
                           "TensorBoardLogger: nothing will be logged (add `logger: TensorBoardLogger(...)`).")

    def is_due(self, trainer: pl.Trainer) -> bool:
        """Whether this batch starts a logging step (once per step under gradient accumulation)."""
        step = trainer.global_step
        return self.enabled and trainer.global_rank == 0 and step % self.every_n_steps == 0 and step != self._last_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if sharded_units(pl_module):  # FSDP2: every forward is a collective (docs/fsdp2.md)
            self.draw_gathered(trainer, pl_module, batch)
        else:
            self.draw(trainer, pl_module, batch)

    def draw_gathered(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Under FSDP2: at every scheduled step (whether or not rank 0 still draws) every process gathers the
        module's parameters together, and rank 0 draws on the gathered module."""
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._gathered_step:
            return
        self._gathered_step = step
        with gathered(pl_module):
            self.draw(trainer, pl_module, batch)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Draw and log the pictures of ``batch`` if this process and step are due."""
        if not self.is_due(trainer):
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        self._last_step = trainer.global_step
        try:
            with torch.no_grad(), isolated_rng():
                pictures = pl_module.visual_diagnostics(batch)
            for name, picture in pictures.items():
                check_picture(name, picture)
        except Exception as error:  # noqa: BLE001  (optional part: never stop training)
            self.fail(trainer, error)
            return
        for name, picture in pictures.items():
            writer.add_image(f"{self.prefix}{name}", picture.detach().float().clamp(0, 1).cpu(),
                             global_step=trainer.global_step)

    @property
    def enabled(self) -> bool:
        return not self.failures

    def fail(self, trainer: pl.Trainer, error: Exception) -> None:
        """Report a drawing failure once, keep it in ``failures`` and stop drawing."""
        message = (f"VisualDiagnostics: drawing the pictures failed on rank {trainer.global_rank} at step "
                   f"{trainer.global_step} and is now off: {type(error).__name__}: {error}")
        self.failures.append(message)
        log.error(message, exc_info=error)


def check_picture(name: str, picture: Any) -> None:
    """A diagnostics picture must be a float ``(3, H, W)`` tensor."""
    if not isinstance(picture, Tensor) or picture.dim() != 3 or picture.shape[0] != 3:
        shape = tuple(picture.shape) if isinstance(picture, Tensor) else type(picture).__name__
        raise ValueError(f"visual_diagnostics()[{name!r}] is {shape}; pictures must be (3, H, W) floats in [0, 1]")
