"""``PretrainDataModule``: the loaders every pretraining DataModule shares, and the probe-data protocol.

Probe-data protocol (what the probe callbacks read from ``trainer.datamodule``):

- classification-capable: ``num_classes: int`` and ``eval_dataset(split) -> Dataset`` of
  ``(float normalised image (3, S, S), int label)`` with the eval transform, ``split`` "train" or "val";
- segmentation-capable: ``num_seg_classes: int`` and ``segmentation_dataset(split, size=None) -> Dataset`` of
  ``(float normalised image (3, S, S), LongTensor mask (S, S))``, 255 = ignore.

A DataModule without labels has no ``num_classes`` attribute (``hasattr`` is False).

Crop guides: the only two entry points the ``callbacks.ContrastiveCrop`` callback (BAM's crop guidance) calls on
``trainer.datamodule`` (it raises a ``TypeError`` naming them when the DataModule lacks them):

- ``crop_guide_dataset(size) -> Dataset`` of ``(float normalised image (3, h, w), int label)``: every training
  image, in training-set order, resized to ``size`` without keeping its aspect ratio;
- ``set_crop_guides(boxes, alpha)``: from the next training batches on, draw each image's crops around its
  box (``boxes`` ``(N, 4)`` normalised ``(y0, x0, y1, x1)``), or by RandomResizedCrop for ``None``;
- ``crop_guides`` (read-only, for inspection): the current ``(N, 4)`` table, or ``None``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import ImageFiles, MultiCropImages
from .resumable import ResumableDataLoader, ResumableSampler
from .transforms import EvalTransform, ResizeTransform
from .views import MultiCropViews, collate_views

__all__ = ["ImageList", "PretrainDataModule", "ClassificationDataMixin", "LayoutError"]


class LayoutError(FileNotFoundError):
    """A data root is missing or does not have the expected folder layout."""


@dataclass(frozen=True)
class ImageList:
    """The image files of one split, with their class indices and class names when the split is labelled."""

    files: list[Path]
    labels: list[int] | None = None
    classes: list[str] | None = None


def check_not_empty(images: ImageList, where: Path, expected: str) -> ImageList:
    """``images`` unchanged, or a ``LayoutError`` naming the folder and the layout it should have."""
    if not images.files:
        raise LayoutError(f"no images found in {where}; expected {expected}")
    return images


class PretrainDataModule(pl.LightningDataModule):
    """What every pretraining DataModule shares: multi-crop training loader, eval loaders, normalisation.

    Subclasses say where their images are (``train_images``; ``eval_images`` for labelled splits). Training
    batches are ``Views``; their crops travel as uint8 and the ``SSLModule`` normalises them in its
    ``on_after_batch_transfer``, i.e. on the training device (with its ``mean``/``std``), unless
    ``normalize_on="worker"``. Why: float crops are 4x the bytes to pass
    from the workers, to pin and to copy to the GPU (BAM's 224/96 recipe, 32 images: 57 MiB instead of
    14 MiB), and a 2-worker CPU loader delivered 146 instead of 116 images/s with uint8 crops
    (``benchmarks/views_throughput.py --loader``); on a GPU the conversion costs microseconds. Loaders used
    outside a Trainer (no hook) should pass ``normalize_on="worker"`` or call ``Views.normalized()``.

    Args:
        batch_size: images per process and training batch.
        num_workers: loader worker processes (per process).
        views: the multi-crop transform, or the name of a preset of ``MultiCropViews.preset``.
        eval_size: side of the probes' centre-cropped images.
        eval_batch_size: batch size of the evaluation loaders; default ``batch_size``.
        normalize_on: ``"device"`` (uint8 crops through the loader, normalised after the transfer; 4x less
            data to move) or ``"worker"`` (normalised floats from the workers, for loaders used outside
            Lightning).
        pin_memory: pin the loaders' batches (faster copies to a GPU).
        shuffle: shuffle the training images.
        seed: the seed of the training order and of the views (a sample's views are a pure function of
            (seed, epoch, index), ``docs/resume.md``); default: the run's seed (``seed_everything``, the CLI's
            ``seed_everything``), else 0.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 8,
        views: MultiCropViews | str = "cribo",
        eval_size: int = 224,
        eval_batch_size: int | None = None,
        normalize_on: Literal["device", "worker"] = "device",
        pin_memory: bool = True,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 (load in the main process) or more")
        if normalize_on not in ("device", "worker"):
            raise ValueError(f"normalize_on={normalize_on!r}; use 'device' or 'worker'")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.views = MultiCropViews.preset(views) if isinstance(views, str) else views
        self.eval_size = eval_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.normalize_on, self.pin_memory, self.shuffle = normalize_on, pin_memory, shuffle
        self._seed = seed
        self._train_dataset: MultiCropImages | None = None
        self._memo: dict[Any, Any] = {}

    # -- where the images are (subclasses) ------------------------------------------------------------------

    def train_images(self) -> ImageList:
        """The images of pretraining (labels kept when the data set has them)."""
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Find the training images (errors about the layout surface here, before any training)."""
        self.train_dataset()

    def train_dataset(self) -> MultiCropImages:
        """The pretraining data set: ``(ViewSample, label, index)`` items (built once)."""
        if self._train_dataset is None:
            images = self.train_images()
            self._train_dataset = MultiCropImages(images.files, images.labels, self.views, seed=self.seed)
        return self._train_dataset

    @property
    def seed(self) -> int:
        """The seed of the training order and views: the ``seed`` argument, else the run's, else 0."""
        if self._seed is not None:
            return int(self._seed)
        return int(os.environ.get("PL_GLOBAL_SEED", "0"))

    @property
    def skipped_images(self) -> int:
        """Unreadable training images skipped so far (over all worker processes)."""
        return self._train_dataset.skipped if self._train_dataset is not None else 0

    # -- ContrastiveCrop guides (callbacks.ContrastiveCrop's two entry points) ---------------------------------

    def crop_guide_dataset(self, size: int | tuple[int, int]) -> Dataset:
        """``(float normalised image, label)`` of every training image in training-set order, resized to
        ``size`` (a side or ``(height, width)``) without keeping the aspect ratio and without augmentation:
        what ContrastiveCrop's box update looks at."""
        dataset = self.train_dataset()
        return ImageFiles(dataset.files, dataset.labels, ResizeTransform(size))

    def set_crop_guides(self, boxes: Tensor | None, alpha: float = 0.6) -> None:
        """ContrastiveCrop (``docs/bam.md``): draw the training crops of image ``i`` around ``boxes[i]``.

        Args:
            boxes: ``(N, 4)`` normalised ``(y0, x0, y1, x1)``, one per training image in training-set order
                (NaN rows: no guide); ``None`` goes back to RandomResizedCrop.
            alpha: parameter of the ``Beta(alpha, alpha)`` position draw (0.6 in BAM).

        The table lives in shared memory and is updated in place, so the loader's worker processes
        (persistent ones too) use it for the batches they prepare next. Call it once before the training
        loader's workers start (``on_fit_start`` is before), then between epochs.
        """
        self.train_dataset().set_crop_guides(boxes, alpha)

    @property
    def crop_guides(self) -> Tensor | None:
        """A copy of the current guide table ``(N, 4)``, or ``None`` when the crops are RandomResizedCrop."""
        return self._train_dataset.crop_guides if self._train_dataset is not None else None

    def train_dataloader(self) -> ResumableDataLoader:
        """The multi-crop loader: order seeded by (seed, epoch), views by (seed, epoch, index), resumable
        mid-epoch (``docs/resume.md``)."""
        dataset = self.train_dataset()
        self._check_enough_images(len(dataset))
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(dataset, seed=dataset.seed, shuffle=self.shuffle, num_replicas=world, rank=rank)
        pin = self.pin_memory and torch.accelerator.is_available()
        return ResumableDataLoader(
            dataset, sampler, self.batch_size, batches_done=self._batches_done if trainer is not None else None,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=pin, drop_last=True,
            collate_fn=functools.partial(collate_views, normalize=self.normalize_on == "worker"),
            generator=torch.Generator().manual_seed(dataset.seed),  # the iterator's base seed: not the global RNG
        )

    def _batches_done(self) -> int:
        """Training batches of the current epoch that the trainer has run (what a resume skips)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> DataLoader | list:
        """``(images, labels)`` batches of ``eval_dataset("val")`` when the data set is labelled, else none."""
        if not hasattr(self, "num_classes"):
            return []
        return self.validation_loader(self.eval_dataset("val"))

    def validation_loader(self, dataset: Dataset) -> DataLoader | list:
        """All of ``dataset`` when the module's ``validation_step`` reads batches; otherwise none during
        ``fit`` and one batch for ``trainer.validate`` (enough for Lightning to run the probes' hooks).

        A ``validation_step`` that reads nothing says so with a ``consumes_batches = False`` attribute.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        step = getattr(type(module), "validation_step", None) if module is not None else None
        if getattr(step, "consumes_batches", True):
            return self._loader(dataset, self.eval_batch_size, shuffle=False, drop_last=False)
        if self.trainer.state.fn == "fit":
            return []
        return self._loader(Subset(dataset, [0]), 1, shuffle=False, drop_last=False)

    # -- helpers --------------------------------------------------------------------------------------------

    def memoized(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per ``key`` (folder scans and json parses are not repeated)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def eval_dataloader(self, split: str) -> DataLoader:
        """A loader over ``eval_dataset(split)`` (in order, nothing dropped)."""
        return self._loader(self.eval_dataset(split), self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        pin = self.pin_memory and torch.accelerator.is_available()  # pinning without an accelerator only warns
        # a generator of its own: without one every iterator draws its base seed from the global RNG, which
        # would shift the training's step randomness by whether and when evaluation ran
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=pin,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def _check_enough_images(self, count: int) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if count // world < self.batch_size:
            raise ValueError(
                f"{count} training images over {world} process(es) give no full batch of {self.batch_size} "
                "(training drops incomplete batches); lower batch_size or add images"
            )


class ClassificationDataMixin:
    """The classification side of the probe-data protocol, for DataModules with labelled ``eval_images``."""

    eval_size: int

    def eval_images(self, split: str) -> ImageList:
        """The labelled images of ``split`` ("train" or "val")."""
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        """Whether the images carry class labels (only then is the DataModule classification-capable)."""
        return True

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        if not self.has_labels:
            # AttributeError: hasattr(datamodule, "num_classes") must be False for unlabelled data.
            raise AttributeError(f"{type(self).__name__} is unlabelled: it has no classes")
        classes = self.eval_images("train").classes
        assert classes is not None
        return classes

    @property
    def num_classes(self) -> int:
        """Number of classes of the probes."""
        return len(self.class_names)

    def eval_dataset(self, split: str) -> Dataset:
        """``(float normalised image (3, S, S), int label)`` pairs of ``split``, ``S = eval_size``; an unreadable
        image raises ``UnreadableImageError`` naming it (evaluation data is never skipped)."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        images = self.eval_images(split)
        return ImageFiles(images.files, images.labels, EvalTransform(self.eval_size), unreadable="error")


def require_dir(path: Path, expected: str) -> Path:
    """``path`` if it is a folder, else a ``LayoutError`` naming it, the layout expected and what is there."""
    if path.is_dir():
        return path
    parent = next((p for p in path.parents if p.is_dir()), None)
    seen = ""
    if parent is not None:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))[:8]
        seen = f"; {parent} holds {names}" if names else f"; {parent} is empty"
    raise LayoutError(f"{path} is not a folder (expected {expected}){seen}")
