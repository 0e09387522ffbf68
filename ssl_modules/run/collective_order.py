"""Keep the collectives of the epoch end in the same order on every process, whatever runs on rank 0 only.

Lightning reduces a value logged with ``sync_dist=True, on_epoch=True`` (a collective) wherever it is first
read after the epoch's last batch. Its progress bar reads the epoch values in ``on_train_epoch_end`` on rank 0
only, so rank 0 would issue those reductions there while the other processes issue them later, after the
collectives of the other epoch-end callbacks (the non-finite guard, the probes): the run hangs, or worse,
pairs unrelated collectives. :class:`EpochEndReductions` reduces them on every process at the end of the
epoch's last batch instead, before any epoch-end hook; the progress bar then reads the reduced values.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["EpochEndReductions", "epoch_ends_after_this_batch"]


def epoch_ends_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the training epoch ends once this batch's hooks have run (last batch, ``max_steps`` reached, or
    a stop the loop will honour). Read in ``on_train_batch_end``; False where Lightning's loop lacks the
    attributes it reads."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        if epoch_loop._is_training_done:
            return True
        return bool(trainer.should_stop and trainer.fit_loop._can_stop_early)
    except AttributeError:  # another Lightning version: nothing is reduced early
        return False


class EpochEndReductions(pl.Callback):
    """Reduce the epoch's ``sync_dist`` values on every process at the end of the epoch's last batch (see the
    module docstring). Every ``SSLModule`` adds it, after ``ExactResume`` (whose stop decision it reads)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.world_size < 2 or not epoch_ends_after_this_batch(trainer):
            return
        results = trainer._results
        if results is not None:
            results.metrics(on_step=False)  # computes and caches each epoch value, in one order everywhere
