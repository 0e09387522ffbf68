"""The data sets of the protocols, read from the real layouts (ImageNet class folders, Pascal VOC).

Items are ``(float image, target)``; random transforms take the pass number and the dataset index, so the
augmentation of an image does not depend on how the set is split between processes or workers. Reading
follows the evaluation rule of ``datamodules.datasets`` (the probes' data sets use it too): an unreadable
image or mask raises ``UnreadableImageError`` naming the file; a mask of another size than its image or with
values that are not class indices raises a ``MaskFormatError`` naming it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from datamodules.base import require_dir
from datamodules.datasets import ImageFiles, SegmentationPairs, UnknownMaskValueError
from datamodules.imagenet import LAYOUT as IMAGENET_LAYOUT
from datamodules.imagenet import class_folders, labelled_images
from ssl_modules.evaluation.checks import EvalDataError, check_dataset

__all__ = ["EvalDataError", "ClassificationFolder", "SegmentationFiles", "imagenet_split", "voc_split",
           "check_dataset"]


class ClassificationFolder(ImageFiles):
    """``(transform(image, index), label)`` of labelled image files."""

    def __init__(self, files: list[Path], labels: list[int], num_classes: int,
                 transform: Callable[[Tensor, int], Tensor]) -> None:
        super().__init__(files, labels, unreadable="error")
        self.num_classes, self.indexed_transform = num_classes, transform

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _ = self._decode_item(index)
        return self.indexed_transform(image, index), self.labels[index]

    def with_transform(self, transform: Callable[[Tensor, int], Tensor]) -> ClassificationFolder:
        return ClassificationFolder(self.files, self.labels, self.num_classes, transform)

    def item_with(self, index: int, transform: Callable[[Tensor, int], Tensor]) -> tuple[Tensor, int]:
        """Item ``index`` under another ``transform`` (e.g. another epoch's augmentation)."""
        image, _ = self._decode_item(index)
        return transform(image, index), self.labels[index]


class SegmentationFiles(SegmentationPairs):
    """``transform(image, mask, index) -> (float image, long mask)`` of image/mask files (255 = ignore).

    ``mask_lut`` (256 entries) maps the stored values to class indices first (Cityscapes' label ids to its
    train ids, ADE20K's 0 to ignore, ...); a stored value whose entry is -1 is an error naming the file.
    """

    unknown_values_fix = "masks must hold class indices"

    def __init__(self, images: list[Path], masks: list[Path], num_classes: int,
                 transform: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]],
                 mask_lut: Tensor | None = None, layout: str = "") -> None:
        super().__init__(images, masks, _no_transform, num_classes)
        self.indexed_transform, self.mask_lut, self.layout = transform, mask_lut, layout

    def _checked(self, mask: Tensor, path: Path) -> Tensor:
        if self.mask_lut is not None:
            mapped = self.mask_lut[mask.long()]
            if bool((mapped < 0).any()):
                values = sorted(set(mask[mapped < 0].tolist()))
                raise UnknownMaskValueError(f"{path} holds mask values {values[:10]} that {self.layout or 'the layout'}"
                                            " does not define; is it a mask of that data set?")
            mask = mapped.to(torch.uint8)
        return super()._checked(mask, path)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.indexed_transform(*self.read(index), index)
        return image, mask.long()

    def with_transform(self, transform: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> SegmentationFiles:
        return SegmentationFiles(self.files, self.masks, self.num_classes, transform, self.mask_lut, self.layout)


def _no_transform(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return image, mask


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
    if not images.files:
        raise EvalDataError(f"{root / split} is empty")
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
    if not images:
        raise EvalDataError(f"the VOC {split} split of {root} is empty")
    return SegmentationFiles(list(images), list(masks), num_classes, transform)
