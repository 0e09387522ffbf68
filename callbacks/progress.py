"""Progress of a probe's work (feature extraction, head training, evaluation) as a bar of the trainer's own
progress-bar machinery: shown only on rank 0 and only when the trainer shows its bar
(``enable_progress_bar``)."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl

__all__ = ["probe_progress"]


def probe_progress(trainer: pl.Trainer | None, iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """``iterable`` wrapped in a transient bar below the trainer's, or unchanged when the trainer shows none."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is None or getattr(bar, "is_disabled", False) or trainer.global_rank != 0:
        return iterable
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    position = 2 * getattr(bar, "process_position", 0) + 1
    return Tqdm(iterable, total=total, desc=desc, leave=False, position=position, dynamic_ncols=True,
                file=sys.stdout)
