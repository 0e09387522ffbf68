"""ADE20K, Cityscapes and COCO-Stuff read as open-hummingbird-eval (and mmseg for the linear protocol) reads
them, on small generated trees in those layouts; a wrong layout is an error naming what was expected."""
from __future__ import annotations

import pytest
import torch

from support.evaldata import ade20k_tree, cityscapes_tree, coco_stuff_tree, tiny_vit, voc_tree

from ssl_modules.evaluation import EvalDataError, evaluate
from ssl_modules.evaluation.layouts import segmentation_classes, segmentation_split

TINY = {"hummingbird": {"memory_size": None, "augmentation_epochs": 1},
        "voc-linear": {"iterations": 2, "batch_size": 4}}


def _masks(dataset: str, root: str, split: str, protocol: str) -> list[torch.Tensor]:
    pairs = segmentation_split(dataset, root, split, lambda image, mask, index: (image, mask), protocol)
    return [pairs[i][1] for i in range(len(pairs))]


def _values(masks: list[torch.Tensor]) -> set[int]:
    return {int(v) for mask in masks for v in mask.unique()}


def test_ade20k_keeps_other_as_a_memory_class_and_ignores_it_when_scoring(tmp_path):
    root = str(ade20k_tree(tmp_path))
    assert segmentation_classes("ade20k", root, "hummingbird") == 151  # open-HB: 150 classes + "other"
    assert _values(_masks("ade20k", root, "train", "hummingbird")) == {0, 1, 12, 150}
    assert _values(_masks("ade20k", root, "val", "hummingbird")) == {255, 1, 12, 150}  # its ignore_index 0


def test_ade20k_linear_segmentation_reduces_the_zero_label(tmp_path):
    root = str(ade20k_tree(tmp_path))
    assert segmentation_classes("ade20k", root, "voc-linear") == 150  # mmseg's reduce_zero_label
    assert _values(_masks("ade20k", root, "train", "voc-linear")) == {255, 0, 11, 149}


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    root = str(cityscapes_tree(tmp_path))
    assert segmentation_classes("cityscapes", root, "hummingbird") == 19
    # road 7 -> 0, sky 23 -> 10, car 26 -> 13, unlabelled 0 -> ignored
    assert _values(_masks("cityscapes", root, "train", "hummingbird")) == {0, 10, 13, 255}


def test_coco_stuff_merges_stuff_into_supercategories_and_ignores_things_and_other(tmp_path):
    root = str(coco_stuff_tree(tmp_path))
    # supercategories but "other", sorted: furniture-stuff, ground, sky, textile
    assert segmentation_classes("coco-stuff", root, "hummingbird") == 4
    # road 149 -> ground 1, clouds 105 and sky-other 157 -> sky 2, things 0 and other 183 -> ignored
    assert _values(_masks("coco-stuff", root, "train", "hummingbird")) == {1, 2, 255}


@pytest.mark.parametrize("dataset, make", [("ade20k", ade20k_tree), ("cityscapes", cityscapes_tree),
                                           ("coco-stuff", coco_stuff_tree)])
def test_hummingbird_and_linear_segmentation_run_on_each_layout(tmp_path, dataset, make):
    root = str(make(tmp_path))
    report = evaluate(tiny_vit(), ["hummingbird", "voc-linear"], seg_dataset=dataset, seg_root=root, overrides=TINY,
                      batch_size=4, show_progress=False)
    hummingbird, linear = report.results
    classes = segmentation_classes(dataset, root, "hummingbird")
    assert hummingbird.settings["num_classes"] == classes
    assert linear.settings["num_classes"] == segmentation_classes(dataset, root, "voc-linear")
    assert 0.0 <= hummingbird.metrics["miou_identity"] <= hummingbird.metrics["miou"] <= 1.0
    assert 0.0 <= linear.metrics["miou"] <= 1.0
    assert hummingbird.card["data"] == f"{dataset} {root}"


def test_a_tree_in_another_layout_is_an_error_naming_the_expected_one(tmp_path):
    voc = str(voc_tree(tmp_path))
    with pytest.raises(EvalDataError, match=r"images/\{training,validation\}"):
        evaluate(tiny_vit(), ["hummingbird"], seg_dataset="ade20k", seg_root=voc, show_progress=False)
    with pytest.raises(EvalDataError, match="gtFine"):
        evaluate(tiny_vit(), ["hummingbird"], seg_dataset="cityscapes", seg_root=voc, show_progress=False)
    with pytest.raises(EvalDataError, match="stuff_val2017.json"):
        evaluate(tiny_vit(), ["hummingbird"], seg_dataset="coco-stuff", seg_root=voc, show_progress=False)


def test_a_missing_mask_names_the_image_and_the_layout(tmp_path):
    root = cityscapes_tree(tmp_path)
    mask = sorted((root / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))[1]
    mask.unlink()
    with pytest.raises(EvalDataError, match="without a mask.*leftImg8bit"):
        segmentation_split("cityscapes", str(root), "val", lambda image, mask, index: (image, mask), "hummingbird")


def test_a_mask_value_the_layout_does_not_define_names_the_file(tmp_path):
    from PIL import Image

    root = coco_stuff_tree(tmp_path)
    mask = sorted((root / "annotations/stuff_annotations/stuff_train2017_pixelmaps").glob("*.png"))[0]
    Image.new("L", Image.open(mask).size, 50).save(mask)  # 50 is a thing id, never in a stuff pixel map
    pairs = segmentation_split("coco-stuff", str(root), "train", lambda image, mask, index: (image, mask),
                               "hummingbird")
    with pytest.raises(ValueError, match=rf"{mask.name}.*\[50\].*coco-stuff"):
        pairs[0]


def test_an_unknown_segmentation_data_set_is_refused_before_the_model_loads():
    with pytest.raises(ValueError, match="seg_dataset 'kitti'.*ade20k"):
        evaluate("no-such-model", ["hummingbird"], seg_dataset="kitti", seg_root="/nowhere")
