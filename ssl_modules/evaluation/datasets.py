"""The data sets of the protocols, read from the real layouts (ImageNet class folders, Pascal VOC).

Items are ``(float image, target)``; random transforms take the pass number and the dataset index, so the
augmentation of an image does not depend on how the set is split between processes or workers.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import require_dir
from datamodules.imagenet import LAYOUT as IMAGENET_LAYOUT
from datamodules.imagenet import class_folders, labelled_images
from datamodules.reading import read_image, read_mask

__all__ = ["EvalDataError", "ClassificationFolder", "SegmentationFiles", "imagenet_split", "voc_split",
           "check_dataset"]

IGNORE = 255


class EvalDataError(ValueError):
    """An evaluation data set is missing, empty or unreadable; the message names the path and the layout."""


class ClassificationFolder(Dataset):
    """``(transform(image, index), label)`` of labelled image files."""

    def __init__(self, files: list[Path], labels: list[int], num_classes: int,
                 transform: Callable[[Tensor, int], Tensor]) -> None:
        self.files, self.labels, self.num_classes, self.transform = files, labels, num_classes, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(read_image(self.files[index]), index), self.labels[index]

    def with_transform(self, transform: Callable[[Tensor, int], Tensor]) -> ClassificationFolder:
        return ClassificationFolder(self.files, self.labels, self.num_classes, transform)


class SegmentationFiles(Dataset):
    """``transform(image, mask, index) -> (float image, long mask)`` of image/mask files (255 = ignore)."""

    def __init__(self, images: list[Path], masks: list[Path], num_classes: int,
                 transform: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> None:
        self.images, self.masks, self.num_classes, self.transform = images, masks, num_classes, transform

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """The raw uint8 image and mask, checked to have the same size and only known values."""
        image, mask = read_image(self.images[index]), read_mask(self.masks[index])
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise EvalDataError(f"{self.masks[index]} is {tuple(mask.shape)} but its image {self.images[index]} "
                                f"is {tuple(image.shape[-2:])}; masks must have their image's size")
        unknown = (mask >= self.num_classes) & (mask != IGNORE)
        if bool(unknown.any()):
            raise EvalDataError(f"{self.masks[index]} holds values {sorted(set(mask[unknown].tolist()))[:5]} outside "
                                f"0..{self.num_classes - 1} and 255; masks must hold class indices")
        return image, mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.read(index)
        image, mask = self.transform(image, mask, index)
        return image, mask.long()

    def with_transform(self, transform: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> SegmentationFiles:
        return SegmentationFiles(self.images, self.masks, self.num_classes, transform)


def imagenet_split(root: str | Path, split: str, transform: Callable[[Tensor, int], Tensor]) -> ClassificationFolder:
    """``<root>/<split>/<class>/*`` labelled by the sorted class folders of ``<root>/train``."""
    root = Path(root).expanduser()
    try:
        classes = class_folders(require_dir(require_dir(root, IMAGENET_LAYOUT) / "train", IMAGENET_LAYOUT))
        if not classes:
            raise EvalDataError(f"{root / 'train'} has no class folders; expected {IMAGENET_LAYOUT}")
        images = labelled_images(root / split, classes, IMAGENET_LAYOUT)
    except EvalDataError:
        raise
    except (OSError, ValueError) as error:
        raise EvalDataError(str(error)) from error
    return ClassificationFolder(list(images.files), list(images.labels), len(classes), transform)


def voc_split(root: str | Path, split: str, transform: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]],
              num_classes: int = 21, train_split: str = "auto") -> SegmentationFiles:
    """Pascal VOC 2012 ``train`` (``train_aug`` when ``SegmentationClassAug/`` is there, as open-HB, CrIBo and
    VICRegL use) or ``val`` image/mask pairs."""
    from datamodules.voc import VOCSegmentationDataModule

    try:
        data = VOCSegmentationDataModule(str(root), train_split=train_split, num_seg_classes=num_classes)
        images, masks = data.segmentation_pairs(split)
    except (OSError, ValueError) as error:
        raise EvalDataError(str(error)) from error
    return SegmentationFiles(list(images), list(masks), num_classes, transform)


def check_dataset(dataset: Dataset, what: str) -> None:
    """A clear error now, rather than after minutes of feature extraction: the set is not empty and its
    first item reads (masks of the right size and values)."""
    if len(dataset) == 0:
        raise EvalDataError(f"{what} is empty")
    try:
        dataset[0]
    except EvalDataError:
        raise
    except Exception as error:  # noqa: BLE001  (any decoding failure is reported with the set's name)
        raise EvalDataError(f"{what}: reading its first item failed: {error}") from error


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Images per class."""
    return torch.bincount(labels.long(), minlength=num_classes)
