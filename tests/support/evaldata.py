"""Tiny data sets in the real layouts (ImageNet class folders, Pascal VOC) and a tiny backbone for the
evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_modules.networks.backbones import Backbone

VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def tiny_vit(seed: int = 0) -> Backbone:
    """ViT-tiny at 32 px, patch 8, depth 2, width 64 (deterministic weights)."""
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _colour_image(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    noise = rng.integers(-40, 40, (height, width, 3))
    return np.clip(colour[None, None] + noise, 0, 255).astype(np.uint8)


def imagenet_tree(root: Path, classes: int = 3, train_per_class: int = 5, val_per_class: int = 3,
                  seed: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: noisy images of one colour per class,
    of varied sizes (the evaluation transforms resize and crop them)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 225, (classes, 3))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for item in range(count):
                height, width = int(rng.integers(36, 56)), int(rng.integers(36, 56))
                Image.fromarray(_colour_image(rng, colours[label], height, width)).save(folder / f"{item}.JPEG",
                                                                                        quality=95)
    return root


def voc_tree(root: Path, train: int = 6, val: int = 4, num_classes: int = 4, seed: int = 0,
             size: tuple[int, int] = (40, 48)) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages/, SegmentationClass/ (palette PNGs with 255 borders) and
    ImageSets/Segmentation/{train,val}.txt: a background with one rectangle of a class colour per image."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 225, (num_classes, 3))
    height, width = size
    for split, count in (("train", train), ("val", val)):
        ids = []
        for item in range(count):
            name = f"{split}_{item:03d}"
            ids.append(name)
            mask = np.zeros((height, width), dtype=np.uint8)
            label = 1 + item % (num_classes - 1)
            top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            mask[top:top + height // 2, left:left + width // 2] = label
            border = np.zeros_like(mask, dtype=bool)
            border[top, left:left + width // 2] = True
            mask[border] = 255
            image = colours[np.where(mask == 255, label, mask)].astype(np.int64)
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(VOC_PALETTE)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _scene(rng: np.random.Generator, colours: np.ndarray, labels: list[int], size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """An image and a label map: a background of ``labels[0]`` with a rectangle of ``labels[1]``."""
    height, width = size
    label_map = np.full((height, width), labels[0], dtype=np.uint8)
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    label_map[top:top + height // 2, left:left + width // 2] = labels[1]
    image = colours[label_map].astype(np.int64)
    image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    return image, label_map


def ade20k_tree(root: Path, train: int = 6, val: int = 4, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}``: jpg images, grayscale png
    annotations with 0 ("other") as background and a rectangle of a class in 1..150."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    colours = rng.integers(0, 255, (256, 3))
    for split, folder, count in (("train", "training", train), ("val", "validation", val)):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for item in range(count):
            name = f"ADE_{split}_{item:08d}"
            image, labels = _scene(rng, colours, [0, (1, 12, 150)[item % 3]], size)
            Image.fromarray(image).save(base / "images" / folder / f"{name}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(base / "annotations" / folder / f"{name}.png")
    return root


def cityscapes_tree(root: Path, train: int = 6, val: int = 4, seed: int = 0,
                    size: tuple[int, int] = (40, 48)) -> Path:
    """``root/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/``: png images and ``*_gtFine_labelIds.png``
    label-id masks (road 7 with a rectangle of car 26, sky 23 or the unlabelled id 0)."""
    rng = np.random.default_rng(seed)
    base = root / "cityscapes"
    colours = rng.integers(0, 255, (256, 3))
    for split, count in (("train", train), ("val", val)):
        for item in range(count):
            city = ("aachen", "bremen")[item % 2]
            name = f"{city}_{item:06d}_000019"
            image, labels = _scene(rng, colours, [7, (26, 23, 0)[item % 3]], size)
            for kind in ("leftImg8bit", "gtFine"):
                (base / kind / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(base / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(labels, mode="L").save(base / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
    return root


# A few COCO-Stuff categories (ids and supercategories as in stuff_val2017.json); 183 is "other".
COCO_STUFF_CATEGORIES = [{"id": 92, "name": "banner", "supercategory": "textile"},
                         {"id": 105, "name": "clouds", "supercategory": "sky"},
                         {"id": 106, "name": "counter", "supercategory": "furniture-stuff"},
                         {"id": 149, "name": "road", "supercategory": "ground"},
                         {"id": 157, "name": "sky-other", "supercategory": "sky"},
                         {"id": 183, "name": "other", "supercategory": "other"}]


def coco_stuff_tree(root: Path, train: int = 6, val: int = 4, seed: int = 0,
                    size: tuple[int, int] = (40, 48)) -> Path:
    """open-hummingbird-eval's COCO-Stuff layout: ``root/images/{train2017,val2017}/*.jpg``,
    ``root/annotations/stuff_annotations/stuff_{split}2017_pixelmaps/*.png`` (stuff ids, 0 for things) and
    ``stuff_val2017.json`` with ``COCO_STUFF_CATEGORIES``."""
    import json

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (256, 3))
    stuff = root / "annotations" / "stuff_annotations"
    stuff.mkdir(parents=True, exist_ok=True)
    (stuff / "stuff_val2017.json").write_text(json.dumps({"categories": COCO_STUFF_CATEGORIES}))
    for split, count in (("train", train), ("val", val)):
        (root / "images" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (stuff / f"stuff_{split}2017_pixelmaps").mkdir(parents=True, exist_ok=True)
        for item in range(count):
            name = f"{item:012d}"
            image, labels = _scene(rng, colours, [149, (105, 157, 0, 183)[item % 4]], size)
            Image.fromarray(image).save(root / "images" / f"{split}2017" / f"{name}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(stuff / f"stuff_{split}2017_pixelmaps" / f"{name}.png")
    return root
