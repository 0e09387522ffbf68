"""The rule for unreadable files: pretraining images are skipped (``tests/datamodules/test_reading.py``), every
evaluation data set (the probes' ``eval_dataset`` and ``segmentation_dataset``) fails naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.evaldata import VOC_PALETTE, imagenet_tree, voc_tree

from datamodules import ImageFiles, ImageNetDataModule, MaskFormatError, VOCSegmentationDataModule
from datamodules.datasets import SegmentationPairs, UnreadableImageError


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:40])
    return path


def test_evaluation_image_files_fail_naming_the_unreadable_file(tmp_path):
    root = imagenet_tree(tmp_path)
    files = sorted((root / "val").rglob("*.JPEG"))
    bad = _truncate(files[1])
    dataset = ImageFiles(files, unreadable="error")
    dataset[0]
    with pytest.raises(UnreadableImageError, match=bad.name):
        dataset[1]
    assert dataset.skipped == 0
    with pytest.raises(ValueError, match="unreadable"):
        ImageFiles(files, unreadable="warn")


def test_the_probes_classification_data_fails_naming_the_unreadable_file(tmp_path):
    root = imagenet_tree(tmp_path)
    data = ImageNetDataModule(str(root), num_workers=0, eval_size=32)
    val = data.eval_dataset("val")
    bad = _truncate(val.files[2])
    with pytest.raises(UnreadableImageError, match=bad.name):
        val[2]


def test_segmentation_pairs_fail_naming_the_unreadable_image_or_mask(tmp_path):
    root = voc_tree(tmp_path)
    data = VOCSegmentationDataModule(str(root), num_workers=0, eval_size=32, num_seg_classes=4)
    pairs = data.segmentation_dataset("val")
    assert isinstance(pairs, SegmentationPairs)
    bad_image, bad_mask = _truncate(pairs.files[1]), _truncate(pairs.masks[2])
    pairs[0]
    with pytest.raises(UnreadableImageError, match=bad_image.name):
        pairs[1]
    with pytest.raises(UnreadableImageError, match=bad_mask.name):
        pairs[2]


def test_mask_sizes_are_checked_from_the_headers_naming_the_mask(tmp_path):
    root = voc_tree(tmp_path)
    pairs = VOCSegmentationDataModule(str(root), num_seg_classes=4).segmentation_dataset("val")
    pairs.check_mask_sizes()
    small = Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="P")
    small.putpalette(VOC_PALETTE)
    small.save(pairs.masks[3])
    with pytest.raises(MaskFormatError, match=f"{pairs.masks[3].name} is 10x10"):
        pairs.check_mask_sizes()
    with pytest.raises(MaskFormatError, match="every mask must have its image's size"):
        pairs[3]
