"""Where a probe's images come from: the probe-data protocol.

Probe-data protocol (implemented by the library's DataModules, see ``datamodules/base.py``):

- classification-capable: ``num_classes: int`` and ``eval_dataset(split) -> Dataset`` of
  ``(float normalised image (3, S, S), int label)``, ``split`` in ``{"train", "val"}``;
- segmentation-capable: ``num_seg_classes: int`` and ``segmentation_dataset(split, size=None) -> Dataset``
  of ``(float normalised image (3, S, S), LongTensor mask (S, S))``, 255 = ignore.

An unreadable image of these data sets fails naming the file (the evaluation rule of
``datamodules.datasets``). Fixed subsets and their split between processes: ``ssl_modules.evaluation.batches``.
"""
from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl

from ssl_modules.evaluation.checks import check_dataset

__all__ = ["ProbeDataError", "resolve_probe_data", "prepare_probe_data", "check_probe_datasets"]

_REQUIREMENTS = {
    "classification": ("num_classes", "eval_dataset"),
    "segmentation": ("num_seg_classes", "segmentation_dataset"),
}
_EXAMPLES = {
    "classification": ("datamodules.ImageNetDataModule", "root: /data/imagenet"),
    "segmentation": ("datamodules.VOCSegmentationDataModule", "root: /data/VOCdevkit"),
}


class ProbeDataError(ValueError):
    """Neither the probe's ``data`` nor the trainer's datamodule implements the protocol the probe needs."""


def _implements(data: Any, kind: str) -> bool:
    # hasattr is False for an unlabelled DataModule whose num_classes property raises AttributeError.
    return data is not None and all(hasattr(data, attribute) for attribute in _REQUIREMENTS[kind])


def resolve_probe_data(probe: str, data: Any | None, trainer: pl.Trainer,
                       kind: Literal["classification", "segmentation"]) -> Any:
    """The probe's own ``data`` if given, else the trainer's datamodule; a ``ProbeDataError`` naming the fix
    when the one found does not implement the ``kind`` side of the protocol."""
    candidate = data if data is not None else trainer.datamodule
    if _implements(candidate, kind):
        return candidate
    count, method = _REQUIREMENTS[kind]
    class_path, init_arg = _EXAMPLES[kind]
    source = (f"its data ({type(data).__name__})" if data is not None else
              f"the trainer's datamodule ({type(candidate).__name__})" if candidate is not None else
              "no datamodule (the trainer was given dataloaders)")
    raise ProbeDataError(
        f"{probe} needs {kind} data with `{count}` and `{method}(...)`, but found {source} without them. "
        f"Pass a DataModule that has them to the probe: in Python `{probe}(data={class_path.split('.')[-1]}(...))`, "
        f"in YAML `data: {{class_path: {class_path}, init_args: {{{init_arg}}}}}` under the callback's init_args; "
        f"or fit with such a datamodule."
    )


def prepare_probe_data(data: Any, trainer: pl.Trainer, stage: str) -> None:
    """Run the Lightning preparation of a DataModule the trainer does not manage itself: ``prepare_data`` on
    one process per node (downloads, generation), a barrier, then ``setup(stage)`` on every process."""
    if data is None or data is trainer.datamodule:
        return
    if trainer.local_rank == 0 and hasattr(data, "prepare_data"):
        data.prepare_data()
    trainer.strategy.barrier("probe_data_prepared")
    if hasattr(data, "setup"):
        data.setup(stage)


def check_probe_datasets(probe: str, data: Any, kind: Literal["classification", "segmentation"],
                         image_size: int | None = None) -> None:
    """Fail before training when a probe's data cannot be read: both splits pass
    ``ssl_modules.evaluation.checks.check_dataset`` (not empty, the first item reads, every mask has its
    image's size)."""
    for split in ("train", "val"):
        try:
            dataset = (data.eval_dataset(split) if kind == "classification"
                       else data.segmentation_dataset(split, image_size))
            check_dataset(dataset, f"the {split} split")
        except Exception as error:
            raise ProbeDataError(f"{probe}: its {kind} data ({type(data).__name__}) cannot be read for the "
                                 f"{split} split: {error}") from error
