"""The segmentation data sets of ``hummingbird`` and ``voc-linear``, read from their released layouts.

Classes and ignored pixels follow the reference code of each protocol:

- ``voc``: Pascal VOC 2012 (``datasets.voc_split``); ``voc_classes`` classes, background 0, 255 ignored.
- ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``. ``hummingbird`` as open-hummingbird-eval (``hbird/data``):
  151 classes with 0 ("other") a class of the memory, and 0 ignored when scoring (its ``ignore_index`` 0);
  ``voc-linear`` as mmseg's ADE20K config (``reduce_zero_label``): 150 classes, 0 ignored (255).
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids mapped to the 19 train ids, every other id
  ignored (255), as open-hummingbird-eval and mmseg do.
- ``coco-stuff``: open-hummingbird-eval's ``coco-stuff``: ``images/{train2017,val2017}/*.jpg`` and
  ``annotations/stuff_annotations/stuff_{train,val}2017_pixelmaps/*.png`` with the categories of
  ``annotations/stuff_annotations/stuff_val2017.json``; the stuff ids (92-182) are merged into their
  supercategories (15 classes, numbered in sorted name order), things (0) and "other" (183) are ignored.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ssl_modules.evaluation.checks import EvalDataError
from ssl_modules.evaluation.datasets import SegmentationFiles, voc_split

__all__ = ["SEGMENTATION_DATASETS", "LAYOUTS", "segmentation_classes", "segmentation_split"]

SEGMENTATION_DATASETS = ("voc", "ade20k", "cityscapes", "coco-stuff")
LAYOUTS = {
    "voc": "VOC2012/ (or VOCdevkit/VOC2012/) with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/",
    "ade20k": "ADEChallengeData2016/ with images/{training,validation}/*.jpg and annotations/{training,validation}/"
              "*.png",
    "cityscapes": "cityscapes/ with leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                  "gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    "coco-stuff": "a COCO root with images/{train2017,val2017}/*.jpg, "
                  "annotations/stuff_annotations/stuff_{train,val}2017_pixelmaps/*.png and "
                  "annotations/stuff_annotations/stuff_val2017.json",
}
# Cityscapes label id -> train id (the 19 evaluated classes); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_ADE_SPLITS = {"train": "training", "val": "validation"}

Transform = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


def segmentation_classes(dataset: str, root: str, protocol: str, voc_classes: int = 21) -> int:
    """The number of classes ``protocol`` scores on ``dataset``."""
    _check_name(dataset)
    if dataset == "voc":
        return voc_classes
    if dataset == "ade20k":
        return 151 if protocol == "hummingbird" else 150
    if dataset == "cityscapes":
        return 19
    return len(_coco_stuff_map(Path(root).expanduser())[1])


def segmentation_split(dataset: str, root: str, split: str, transform: Transform, protocol: str,
                       voc_classes: int = 21) -> SegmentationFiles:
    """The ``train`` or ``val`` image/mask pairs of ``dataset`` under ``root``, masks mapped to class indices
    as ``protocol``'s reference code reads them; an ``EvalDataError`` naming the expected layout otherwise."""
    _check_name(dataset)
    if dataset == "voc":
        return voc_split(root, split, transform, voc_classes)
    base = Path(root).expanduser()
    if dataset == "ade20k":
        images, masks, lut = _ade20k(base, split, protocol)
    elif dataset == "cityscapes":
        images, masks, lut = _cityscapes(base, split)
    else:
        images, masks, lut = _coco_stuff(base, split)
    if not images:
        raise EvalDataError(f"the {dataset} {split} split of {root} is empty; expected {LAYOUTS[dataset]}")
    classes = segmentation_classes(dataset, root, protocol, voc_classes)
    return SegmentationFiles(images, masks, classes, transform, lut, f"the {dataset} layout")


def _check_name(dataset: str) -> None:
    if dataset not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown segmentation data set {dataset!r}; choose from {', '.join(SEGMENTATION_DATASETS)}")


def _folder(path: Path, dataset: str) -> Path:
    if not path.is_dir():
        raise EvalDataError(f"{path} is not a folder; {dataset} expects {LAYOUTS[dataset]}")
    return path


def _root_holding(base: Path, name: str, marker: str, dataset: str) -> Path:
    """``base`` when it holds ``marker``, else ``base/name`` when that does."""
    for candidate in (base, base / name):
        if (candidate / marker).is_dir():
            return candidate
    raise EvalDataError(f"{base} has no {marker}/ (nor {name}/{marker}/); {dataset} expects {LAYOUTS[dataset]}")


def _pairs(images: list[Path], mask_of: Callable[[Path], Path], dataset: str) -> tuple[list[Path], list[Path]]:
    masks = [mask_of(image) for image in images]
    missing = [str(mask) for mask in masks if not mask.is_file()]
    if missing:
        raise EvalDataError(f"{len(missing)} image(s) without a mask, e.g. {missing[0]}; {dataset} expects "
                            f"{LAYOUTS[dataset]}")
    return images, masks


def _lut(mapping: dict[int, int], default: int) -> Tensor:
    table = torch.full((256,), default, dtype=torch.long)
    for stored, label in mapping.items():
        table[stored] = label
    return table


def _ade20k(base: Path, split: str, protocol: str) -> tuple[list[Path], list[Path], Tensor]:
    root = _root_holding(base, "ADEChallengeData2016", "annotations", "ade20k")
    folder = _folder(root / "images" / _ADE_SPLITS[split], "ade20k")
    annotations = _folder(root / "annotations" / _ADE_SPLITS[split], "ade20k")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if protocol == "hummingbird":  # 151 classes; 0 ("other") is ignored when scoring only
        lut = torch.arange(256)
        if split == "val":
            lut[0] = 255
    else:  # mmseg's reduce_zero_label: 1..150 -> 0..149, 0 -> 255
        lut = (torch.arange(256) - 1).clamp(min=0)
        lut[0], lut[255] = 255, 255
    return (*_pairs(images, lambda image: annotations / f"{image.stem}.png", "ade20k"), lut)


def _cityscapes(base: Path, split: str) -> tuple[list[Path], list[Path], Tensor]:
    root = _root_holding(base, "cityscapes", "leftImg8bit", "cityscapes")
    folder = _folder(root / "leftImg8bit" / split, "cityscapes")
    labels = _folder(root / "gtFine" / split, "cityscapes")
    images = sorted(folder.glob("*/*_leftImg8bit.png"))

    def mask_of(image: Path) -> Path:
        return labels / image.parent.name / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")

    return (*_pairs(images, mask_of, "cityscapes"), _lut(CITYSCAPES_TRAIN_IDS, 255))


def _coco_stuff_map(root: Path) -> tuple[dict[int, int], list[str]]:
    """Stuff category id -> supercategory index, and the supercategory names (open-HB's ``coco-stuff``)."""
    path = root / "annotations" / "stuff_annotations" / "stuff_val2017.json"
    if not path.is_file():
        raise EvalDataError(f"no {path}; coco-stuff expects {LAYOUTS['coco-stuff']}")
    try:
        categories = json.loads(path.read_text())["categories"]
        names = sorted({c["supercategory"] for c in categories} - {"other"})
        index = {name: i for i, name in enumerate(names)}
        mapping = {int(c["id"]): index.get(c["supercategory"], 255) for c in categories}
    except (ValueError, KeyError, TypeError) as error:
        raise EvalDataError(f"{path} is not a COCO categories file ({error!r})") from error
    return mapping, names


def _coco_stuff(base: Path, split: str) -> tuple[list[Path], list[Path], Tensor]:
    mapping, _ = _coco_stuff_map(base)
    folder = _folder(base / "images" / f"{split}2017", "coco-stuff")
    pixelmaps = _folder(base / "annotations" / "stuff_annotations" / f"stuff_{split}2017_pixelmaps", "coco-stuff")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    lut = _lut({**mapping, 0: 255, 183: 255, 255: 255}, -1)  # things (0) and "other" (183) ignored
    return (*_pairs(images, lambda image: pixelmaps / f"{image.stem}.png", "coco-stuff"), lut)
