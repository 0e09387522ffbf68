"""``VOCSegmentationDataModule``: Pascal VOC 2012 segmentation (and its augmented training set)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader, Dataset

from .base import ImageList, LayoutError, PretrainDataModule, check_not_empty
from .datasets import SegmentationPairs
from .transforms import SegmentationEvalTransform

__all__ = ["VOCSegmentationDataModule", "VOC_CLASSES", "find_voc_root"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LAYOUT = ("<root>/VOC2012/ (or <root>/VOCdevkit/VOC2012/, or <root> itself) with JPEGImages/, SegmentationClass/ "
          "and ImageSets/Segmentation/{train,val}.txt; optionally SegmentationClassAug/ and its train_aug.txt")
# Where the augmented set's list is found in the usual distributions.
_AUG_LISTS = ("ImageSets/SegmentationAug/train_aug.txt", "ImageSets/Segmentation/train_aug.txt",
              "ImageSets/Segmentation/trainaug.txt")


def find_voc_root(root: Path) -> Path:
    """The VOC2012 folder: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    state = "does not exist" if not root.exists() else "has no JPEGImages/ folder where expected"
    raise LayoutError(f"{root} {state}; expected {LAYOUT}")


def read_id_list(path: Path) -> list[str]:
    """Image ids of an ImageSets list; DeepLab-style lines (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``)
    give their image's stem."""
    if not path.is_file():
        raise LayoutError(f"{path} not found; expected {LAYOUT}")
    ids = []
    for line in path.read_text().splitlines():
        token = line.split()[0] if line.strip() else ""
        if token:
            ids.append(Path(token).stem)
    return ids


class VOCSegmentationDataModule(PretrainDataModule):
    """Pascal VOC 2012: segmentation data for the probes, and its training images for pretraining.

    The training split is ``train`` (1,464 images) or, when ``SegmentationClassAug/`` and its list are present,
    the augmented ``train_aug`` set (10,582); validation is ``val`` (1,449). Masks are palette PNGs whose
    palette *indices* are the classes (0 background, 1..20 objects, 255 object borders / ignore). A mask value
    outside those is an error naming the file (``unknown_mask_values="ignore"`` maps it to 255 instead, with a
    warning), because a silently wrong label would bias every probe.

    Args:
        root: the VOC2012 folder, or a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``.
        train_split: ``"auto"`` (``train_aug`` when present, else ``train``), ``"train"`` or ``"train_aug"``.
        num_seg_classes: classes of the masks, background included (21 for VOC).
        unknown_mask_values: ``"error"`` or ``"ignore"`` (map to 255 with a warning).
        **kwargs: loader and view arguments of ``PretrainDataModule`` (``eval_size`` is the probes' side).
    """

    def __init__(self, root: str, train_split: Literal["auto", "train", "train_aug"] = "auto",
                 num_seg_classes: int = 21, unknown_mask_values: Literal["error", "ignore"] = "error",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if train_split not in ("auto", "train", "train_aug"):
            raise ValueError(f"train_split={train_split!r}; use 'auto', 'train' or 'train_aug'")
        if unknown_mask_values not in ("error", "ignore"):
            raise ValueError(f"unknown_mask_values={unknown_mask_values!r}; use 'error' or 'ignore'")
        self.root = Path(root).expanduser()
        self.train_split, self.unknown_mask_values = train_split, unknown_mask_values
        self.num_seg_classes = num_seg_classes

    @property
    def voc_root(self) -> Path:
        return self.memoized("voc_root", lambda: find_voc_root(self.root))

    def _aug_list(self) -> Path | None:
        if not (self.voc_root / "SegmentationClassAug").is_dir():
            return None
        return next((self.voc_root / p for p in _AUG_LISTS if (self.voc_root / p).is_file()), None)

    def _split_source(self, split: str) -> tuple[Path, str]:
        """The id list and the mask folder of ``split``."""
        if split == "val":
            return self.voc_root / "ImageSets/Segmentation/val.txt", "SegmentationClass"
        if split != "train":
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        aug = self._aug_list()
        if self.train_split == "train_aug" and aug is None:
            raise LayoutError(f"train_split='train_aug' but {self.voc_root} has no SegmentationClassAug/ with a list "
                              f"({', '.join(_AUG_LISTS)}); use train_split='train'")
        if aug is not None and self.train_split != "train":
            return aug, "SegmentationClassAug"
        return self.voc_root / "ImageSets/Segmentation/train.txt", "SegmentationClass"

    def segmentation_pairs(self, split: str) -> tuple[list[Path], list[Path]]:
        """Image and mask paths of ``split`` ("train" or "val")."""
        def scan() -> tuple[list[Path], list[Path]]:
            id_list, mask_folder = self._split_source(split)
            ids = read_id_list(id_list)
            images = [self.voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]
            masks = [self.voc_root / mask_folder / f"{i}.png" for i in ids]
            check_not_empty(ImageList(images), id_list, f"image ids in {id_list.name}")
            missing = [p for p in images + masks if not p.is_file()]
            if missing:
                raise LayoutError(f"{len(missing)} files listed by {id_list} are missing (e.g. {missing[0]}); "
                                  f"expected {LAYOUT}")
            return images, masks
        return self.memoized(("pairs", split), scan)

    def train_images(self) -> ImageList:
        return ImageList(self.segmentation_pairs("train")[0])

    def segmentation_dataset(self, split: str, size: int | None = None) -> Dataset:
        """``(float normalised image (3, S, S), LongTensor mask (S, S))`` pairs, 255 = ignore, ``S = size``
        (default ``eval_size``): shorter side resized to S (masks: nearest), centre crop."""
        images, masks = self.segmentation_pairs(split)
        return SegmentationPairs(images, masks, SegmentationEvalTransform(size or self.eval_size),
                                 self.num_seg_classes, 255, self.unknown_mask_values)

    def val_dataloader(self) -> DataLoader:
        """``(images, masks)`` batches of ``segmentation_dataset("val")`` (see ``validation_loader``)."""
        return self.validation_loader(self.segmentation_dataset("val"))
