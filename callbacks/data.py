"""Where a probe's images come from: the probe-data protocol, fixed subsets, and per-process shards.

Probe-data protocol (implemented by the library's DataModules, see ``datamodules/base.py``):

- classification-capable: ``num_classes: int`` and ``eval_dataset(split) -> Dataset`` of
  ``(float normalised image (3, S, S), int label)``, ``split`` in ``{"train", "val"}``;
- segmentation-capable: ``num_seg_classes: int`` and ``segmentation_dataset(split, size=None) -> Dataset``
  of ``(float normalised image (3, S, S), LongTensor mask (S, S))``, 255 = ignore.

Evaluation sets are split between processes by whole batches: the subset is cut into batches of
``batch_size`` in order and process ``r`` of ``W`` embeds batches ``r, r + W, r + 2W, ...``. Every batch then
holds the same images as in a single-process run, so the features are the same bits, and gathering them and
sorting by dataset index reproduces the single-process order exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ProbeDataError",
    "resolve_probe_data",
    "prepare_probe_data",
    "fixed_subset",
    "batch_chunks",
    "shard_batches",
    "sharded_loader",
    "check_probe_datasets",
]

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


def fixed_subset(size: int, fraction: float = 1.0, max_items: int | None = None, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded random subset of ``range(size)``: ``fraction`` of it, at most ``max_items``.

    The same arguments give the same subset in every process and every run.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    count = max(1, round(size * fraction)) if size else 0
    if max_items is not None:
        count = min(count, max_items)
    if count >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def batch_chunks(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut in order into batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    return [list(indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]


def shard_batches(chunks: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """The batches process ``rank`` handles: ``chunks[rank::world_size]``."""
    return list(chunks[rank::world_size])


def sharded_loader(dataset: Dataset, batches: Sequence[list[int]], num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A loader yielding exactly ``batches`` (lists of dataset indices), in order.

    It has its own seeded generator: a DataLoader without one draws its workers' base seed from the global
    random generator, which would make the method's training depend on whether probes are attached.
    """
    return DataLoader(dataset, batch_sampler=list(batches), num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))


def check_probe_datasets(probe: str, data: Any, kind: Literal["classification", "segmentation"],
                         image_size: int | None = None) -> None:
    """Fail before training when a probe's data cannot be read: both splits exist and are not empty, their
    first item reads, and (segmentation) every mask has its image's size (read from the file headers)."""
    for split in ("train", "val"):
        try:
            dataset = (data.eval_dataset(split) if kind == "classification"
                       else data.segmentation_dataset(split, image_size))
            if len(dataset) == 0:
                raise ValueError(f"the {split} split is empty")
            dataset[0]
            if kind == "segmentation":
                _check_mask_sizes(dataset)
        except Exception as error:
            raise ProbeDataError(f"{probe}: its {kind} data ({type(data).__name__}) cannot be read for the "
                                 f"{split} split: {error}") from error


def _check_mask_sizes(dataset: Any) -> None:
    images, masks = getattr(dataset, "files", None), getattr(dataset, "masks", None)
    if images is None or masks is None:
        return
    from PIL import Image

    for image, mask in zip(images, masks):
        with Image.open(image) as a, Image.open(mask) as b:
            if a.size != b.size:
                raise ValueError(f"{mask} is {b.size[1]}x{b.size[0]} but its image {image} is "
                                 f"{a.size[1]}x{a.size[0]}; every mask must have its image's size")
