"""Every DataModule on generated data in its layout, through real DataLoaders with workers; bad layouts."""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from support.dm_testdata import (NUM_CLASSES, NUM_TRAIN, NUM_VAL, copy_voc, random_rgb, shared_scenes, tiny_views,
                         write_image)
from PIL import Image

from datamodules import (IMAGENET_MEAN, IMAGENET_STD, COCODataModule, ImageFolderDataModule, ImageNetDataModule,
                         LayoutError, MultiCropViews, SceneConfig, SyntheticScenesDataModule, UnknownMaskValueError,
                         Views, VOCSegmentationDataModule, read_mask)
from datamodules.reading import list_images
from ssl_modules.methods.base import SSLModule

LOADER = dict(batch_size=8, num_workers=2, views=tiny_views(), eval_size=32)


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenesDataModule:
    return shared_scenes()


def check_views_batch(batch, batch_size: int = 8, labelled: bool = True) -> None:
    assert isinstance(batch, Views)
    assert [tuple(c.shape) for c in batch.crops] == [(batch_size, 3, 32, 32)] * 2 + [(batch_size, 3, 16, 16)] * 2
    assert all(c.dtype == torch.uint8 for c in batch.crops)  # normalised after the transfer
    assert batch.boxes.shape == (batch_size, 4, 4) and batch.flipped.shape == (batch_size, 4)
    assert torch.equal(batch.image_size, torch.full((batch_size, 2), 48.0))
    assert ((batch.label >= 0) & (batch.label < NUM_CLASSES)).all() if labelled else (batch.label == -1).all()
    assert len(set(batch.index.tolist())) == batch_size


def first_batch(loader):
    return next(iter(loader))


# -- the real loaders on the generated layouts ------------------------------------------------------------------

def test_imagenet_layout(scenes):
    module = ImageNetDataModule(str(scenes.imagenet_root), **LOADER)
    module.setup("fit")
    assert module.num_classes == NUM_CLASSES and module.class_names[0] == "00_disc"
    loader = module.train_dataloader()
    assert loader.drop_last and loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == NUM_TRAIN // 8
    for batch in batches:
        check_views_batch(batch)
    image, label = module.eval_dataset("val")[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    images, labels = first_batch(module.val_dataloader())
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long
    assert len(module.eval_dataset("train")) == NUM_TRAIN and len(module.eval_dataset("val")) == NUM_VAL


def test_imagenet_labels_are_the_largest_object_of_the_voc_masks(scenes):
    images = ImageNetDataModule(str(scenes.imagenet_root)).eval_images("train")
    agree = 0
    for path, label in zip(images.files, images.labels):
        mask = read_mask(scenes.voc_root / "VOC2012" / "SegmentationClass" / f"{path.stem}.png").numpy()
        counts = np.bincount(mask[(mask > 0) & (mask < 255)], minlength=NUM_CLASSES + 1)
        agree += int(np.argmax(counts) == label + 1)
    assert agree >= 0.9 * len(images.files)  # border pixels (255) can tip near ties


def test_coco_layout_and_filters(scenes, tmp_path):
    module = COCODataModule(str(scenes.coco_root), **LOADER)
    module.setup("fit")
    check_views_batch(first_batch(module.train_dataloader()), labelled=False)
    assert len(module.train_dataset()) == NUM_TRAIN and not hasattr(module, "num_classes")
    assert module.val_dataloader() == []
    root = tmp_path / "coco"
    shutil.copytree(scenes.coco_root, root)
    write_image(root / "train2017" / "999999999999.jpg", random_rgb(48, 48))  # a file the json does not list
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"]}
    data["images"].append(dict(id=123456789, file_name=data["images"][0]["file_name"].replace("0", "9", 1),
                               height=48, width=48))  # listed, no annotations
    write_image(root / "train2017" / data["images"][-1]["file_name"], random_rgb(48, 48))
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    counts = {f: len(COCODataModule(str(root), image_filter=f).train_images().files)
              for f in ("all", "listed", "annotated")}
    assert counts == {"all": NUM_TRAIN + 2, "listed": NUM_TRAIN + 1, "annotated": len(annotated)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_coco_annotations_agree_with_the_masks(scenes):
    coco_api = pytest.importorskip("pycocotools.coco")
    coco = coco_api.COCO(str(scenes.coco_root / "annotations" / "instances_val2017.json"))
    assert sorted(coco.getCatIds()) == list(range(1, NUM_CLASSES + 1))
    checked = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        stem = f"val_{image_id - 10_000_001:06d}"
        voc = read_mask(scenes.voc_root / "VOC2012" / "SegmentationClass" / f"{stem}.png").numpy()
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(annotation).astype(bool)
            assert mask.shape == (info["height"], info["width"]) and mask.sum() == annotation["area"]
            inside = voc[mask]
            assert (inside[inside != 255] == annotation["category_id"]).all()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert annotation["bbox"] == [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
            checked += 1
    assert checked >= NUM_VAL


def test_voc_layout(scenes):
    module = VOCSegmentationDataModule(str(scenes.voc_root), num_seg_classes=NUM_CLASSES + 1, **LOADER)
    module.setup("fit")
    check_views_batch(first_batch(module.train_dataloader()), labelled=False)
    assert module.num_seg_classes == NUM_CLASSES + 1
    image, mask = module.segmentation_dataset("val", size=24)[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert mask.shape == (24, 24) and mask.dtype == torch.long
    images, masks = first_batch(module.val_dataloader())
    assert images.shape == (8, 3, 32, 32) and masks.shape == (8, 32, 32)
    values = set(masks.unique().tolist())
    assert 0 in values and 255 in values and values <= set(range(NUM_CLASSES + 1)) | {255}


@pytest.mark.parametrize("where", ["VOCdevkit parent", "VOCdevkit", "VOC2012"])
def test_voc_root_may_point_at_any_level(scenes, tmp_path, where):
    voc = copy_voc(scenes, tmp_path)
    root = {"VOCdevkit parent": tmp_path, "VOCdevkit": voc.parent, "VOC2012": voc}[where]
    assert VOCSegmentationDataModule(str(root)).voc_root == voc


def test_voc_augmented_training_set_is_used_when_present(scenes, tmp_path):
    voc = copy_voc(scenes, tmp_path)
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    (voc / "SegmentationClassAug").mkdir()
    for i in ids:  # SBD-style grayscale masks
        Image.fromarray(read_mask(voc / "SegmentationClass" / f"{i}.png").numpy()).save(
            voc / "SegmentationClassAug" / f"{i}.png")
    (voc / "ImageSets/SegmentationAug").mkdir()
    (voc / "ImageSets/SegmentationAug/train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids[:30]))
    auto = VOCSegmentationDataModule(str(voc), num_seg_classes=NUM_CLASSES + 1)
    images, masks = auto.segmentation_pairs("train")
    assert len(images) == 30 and masks[0].parent.name == "SegmentationClassAug"
    assert len(auto.segmentation_dataset("train")) == 30
    plain = VOCSegmentationDataModule(str(voc), train_split="train")
    assert len(plain.segmentation_pairs("train")[0]) == NUM_TRAIN
    with pytest.raises(LayoutError, match="train_split='train'"):
        VOCSegmentationDataModule(str(scenes.voc_root), train_split="train_aug").segmentation_pairs("train")


def test_voc_unknown_mask_values_error_or_map_to_ignore(scenes, tmp_path):
    voc = copy_voc(scenes, tmp_path)
    first = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    path = voc / "SegmentationClass" / f"{first}.png"
    mask = Image.open(path)
    values = np.asarray(mask).copy()
    values[:4, :4] = 9  # not a class of 0..4, not 255
    broken = Image.fromarray(values)
    broken.putpalette(mask.getpalette())
    broken.save(path)
    strict = VOCSegmentationDataModule(str(voc), num_seg_classes=NUM_CLASSES + 1)
    with pytest.raises(UnknownMaskValueError, match=f"{first}.png.*9.*unknown_mask_values='ignore'"):
        strict.segmentation_dataset("val")[0]
    lenient = VOCSegmentationDataModule(str(voc), num_seg_classes=NUM_CLASSES + 1, unknown_mask_values="ignore")
    with pytest.warns(UserWarning, match="mapped to 255"):
        _, out = lenient.segmentation_dataset("val", size=48)[0]
    assert (out[:4, :4] == 255).all()


def test_image_folder_labelled_and_unlabelled(scenes):
    labelled = ImageFolderDataModule(str(scenes.imagenet_root / "train"), labelled=True,
                                     val_root=str(scenes.imagenet_root / "val"), **LOADER)
    labelled.setup("fit")
    check_views_batch(first_batch(labelled.train_dataloader()))
    assert labelled.num_classes == NUM_CLASSES and len(labelled.eval_dataset("val")) == NUM_VAL
    held_out = ImageFolderDataModule(str(scenes.imagenet_root / "train"), labelled=True, val_fraction=0.25)
    train, val = held_out.eval_images("train"), held_out.eval_images("val")
    assert len(train.files) + len(val.files) == NUM_TRAIN and not set(train.files) & set(val.files)
    assert len(held_out.train_images().files) == len(train.files)
    unlabelled = ImageFolderDataModule(str(scenes.coco_root), **LOADER)  # images in sub-folders, any depth
    unlabelled.setup("fit")
    check_views_batch(first_batch(unlabelled.train_dataloader()), labelled=False)
    assert len(unlabelled.train_dataset()) == NUM_TRAIN + NUM_VAL
    assert not hasattr(unlabelled, "num_classes") and unlabelled.val_dataloader() == []
    with pytest.raises(RuntimeError, match="labelled=True"):
        unlabelled.eval_dataset("train")


# -- the synthetic DataModule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["imagenet", "coco", "voc"])
def test_synthetic_pretraining_reads_each_layout(scenes, layout):
    module = shared_scenes(layout=layout)
    module.setup("fit")
    batch = first_batch(module.train_dataloader())
    check_views_batch(batch, labelled=layout == "imagenet")
    assert len(module.train_dataset()) == NUM_TRAIN


def test_synthetic_probe_data_protocol(scenes):
    module = shared_scenes()
    assert module.num_classes == NUM_CLASSES and module.num_seg_classes == NUM_CLASSES + 1
    image, label = module.eval_dataset("train")[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < NUM_CLASSES
    assert abs(float(image.mean())) < 2.0  # normalised, not [0, 255]
    image, mask = module.segmentation_dataset("val", size=40)[3]
    assert image.shape == (3, 40, 40) and mask.shape == (40, 40) and mask.dtype == torch.long
    assert module.imagenet_root.is_dir() and module.coco_root.is_dir() and module.voc_root.is_dir()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_cached_and_atomic(tmp_path, monkeypatch):
    scene = SceneConfig(image_size=32, num_classes=3, num_train=6, num_val=3)
    small = dict(scene=scene, **LOADER)
    first = SyntheticScenesDataModule(root=str(tmp_path / "a"), **small)
    second = SyntheticScenesDataModule(root=str(tmp_path / "b"), generation_workers=1, **small)
    other_seed = SyntheticScenesDataModule(root=str(tmp_path / "c"), scene=replace(scene, seed=1), **LOADER)
    for module in (first, second, other_seed):
        module.prepare_data()
    assert tree_bytes(first.data_dir) == tree_bytes(second.data_dir)  # 2 processes == 1 process, same bytes
    assert tree_bytes(first.data_dir) != tree_bytes(other_seed.data_dir)
    assert first.data_dir.name != other_seed.data_dir.name  # keyed by the parameters

    import datamodules.synthetic as synthetic

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user stopped it
    monkeypatch.setattr(synthetic.layouts, "generate_scenes", fail)
    first.prepare_data()  # cached: no generation
    interrupted = SyntheticScenesDataModule(root=str(tmp_path / "d"), **small)
    with pytest.raises(KeyboardInterrupt):
        interrupted.prepare_data()
    assert not any((tmp_path / "d").iterdir())  # no half-written cache, no temporary folder left


def test_colour_alone_does_not_tell_the_class(tmp_path):
    """A classifier on per-image colour histograms is at chance; on the masks' class areas it is not."""
    module = SyntheticScenesDataModule(root=str(tmp_path),
                                       scene=SceneConfig(image_size=40, num_classes=4, num_train=320, num_val=160))
    module.prepare_data()

    def features(split):
        images = module.eval_images(split)
        colours, areas = [], []
        for path in images.files:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB")) // 64  # 4 levels per channel
            colours.append(np.bincount((pixels @ [16, 4, 1]).ravel(), minlength=64) / pixels[..., 0].size)
            mask = read_mask(module.voc_root / "VOC2012" / "SegmentationClass" / f"{path.stem}.png").numpy()
            areas.append(np.bincount(mask.ravel(), minlength=256)[1:5] / mask.size)
        as_tensor = lambda rows: torch.tensor(np.array(rows), dtype=torch.float32)  # noqa: E731
        return as_tensor(colours), as_tensor(areas), torch.tensor(images.labels)

    def accuracy(train_x, train_y, val_x, val_y):
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
        linear = torch.nn.Linear(train_x.shape[1], 4)
        optimizer = torch.optim.Adam(linear.parameters(), lr=0.05, weight_decay=1e-3)
        for _ in range(200):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
            optimizer.step()
        return (linear(val_x).argmax(1) == val_y).float().mean().item()

    train_colours, train_areas, train_y = features("train")
    val_colours, val_areas, val_y = features("val")
    assert accuracy(train_colours, train_y, val_colours, val_y) < 0.25 + 0.15  # chance 0.25
    assert accuracy(train_areas, train_y, val_areas, val_y) > 0.8  # the labels themselves are learnable


# -- Lightning and the CLI ---------------------------------------------------------------------------------------

class RecordingModule(SSLModule):
    """Records what a training step receives (the SSLModule normalises the DataModule's uint8 crops)."""

    def __init__(self) -> None:
        super().__init__("vit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=64,
                                                                     num_heads=2))
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.received: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, Views)
        self.received.append([crop.detach().clone() for crop in batch.crops])
        return self.weight * 0 + batch.crops[0].mean() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_the_module_receives_float_normalised_crops(tmp_path):
    data = shared_scenes()
    module = RecordingModule()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(module.received) == 2
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for crops in module.received:
        for crop in crops:
            assert crop.dtype == torch.float32
            # undoing the ImageNet normalisation gives back the uint8 levels the DataModule produced
            levels = (crop * std + mean) * 255
            assert (levels - levels.round()).abs().max() < 1e-3
            assert levels.round().min() >= 0 and levels.round().max() <= 255
            assert levels.round().unique().numel() > 16  # real image content, not a constant


def test_cli_builds_the_datamodules_from_a_config(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticScenesDataModule, "data")
    config = parser.parse_object({"data": {
        "root": str(tmp_path), "scene": {"num_train": 8, "image_size": 40}, "batch_size": 4, "num_workers": 0,
        "layout": "coco",
        "views": {"class_path": "datamodules.MultiCropViews", "init_args": {"global_size": 32, "n_local": 2}},
    }})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    module = instantiate(config).data
    assert isinstance(module, SyntheticScenesDataModule) and module.batch_size == 4 and module.layout == "coco"
    assert module.scene == SceneConfig(num_train=8, image_size=40)  # the scene is one typed argument
    assert isinstance(module.views, MultiCropViews) and module.views.sizes == [32, 32, 96, 96]
    config = parser.parse_object({"data": {"root": str(tmp_path), "views": "vicregl_convnext"}})
    assert instantiate(config).data.views.sizes == [64, 64] + [32] * 6  # preset at crop_sizes


# -- bad layouts and settings -------------------------------------------------------------------------------------

def test_missing_or_mistyped_roots_name_the_path_and_the_layout(scenes, tmp_path):
    cases = [
        (ImageNetDataModule(str(tmp_path / "imagnet")), "imagnet", "train/<wnid>/*.JPEG"),
        (ImageNetDataModule(str(scenes.imagenet_root / "train")), "train/train", "00_disc"),  # lists what is there
        (COCODataModule(str(tmp_path / "coco")), "coco", "train2017"),
        (COCODataModule(str(scenes.coco_root), split="train2014"), "train2014", "instances_"),
        (VOCSegmentationDataModule(str(tmp_path / "voc")), "voc", "JPEGImages"),
        (ImageFolderDataModule(str(tmp_path / "photos")), "photos", "image files"),
        (ImageFolderDataModule(str(tmp_path), labelled=True), str(tmp_path), "sub-folders"),
    ]
    for module, path, layout in cases:
        with pytest.raises(LayoutError) as error:
            module.setup("fit")
        message = str(error.value)
        assert path in message and layout in message, f"{message!r} should name {path} and {layout}"
    (tmp_path / "train2017").mkdir()
    with pytest.raises(LayoutError, match="instances_train2017.json"):
        COCODataModule(str(tmp_path), image_filter="listed").setup()


def test_empty_and_malformed_splits(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "train" / "n02").mkdir()
    with pytest.raises(LayoutError, match="no images found"):
        ImageNetDataModule(str(tmp_path)).setup("fit")
    write_image(tmp_path / "train" / "n01" / "a.JPEG", random_rgb())
    ImageNetDataModule(str(tmp_path)).setup("fit")
    write_image(tmp_path / "val" / "flat.JPEG", random_rgb())
    with pytest.raises(LayoutError, match="no class folders"):
        ImageNetDataModule(str(tmp_path)).eval_images("val")
    (tmp_path / "val" / "n99").mkdir()
    with pytest.raises(LayoutError, match="n99"):
        ImageNetDataModule(str(tmp_path)).eval_images("val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="no images found"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup()
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(LayoutError, match="no images found"):
        VOCSegmentationDataModule(str(voc)).setup()
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    with pytest.raises(LayoutError, match="2007_000032"):
        VOCSegmentationDataModule(str(voc)).setup()


def test_impossible_datamodule_settings(scenes):
    with pytest.raises(ValueError, match="no full batch"):
        ImageNetDataModule(str(scenes.imagenet_root), batch_size=NUM_TRAIN + 1).train_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        ImageNetDataModule(str(scenes.imagenet_root), batch_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenesDataModule(scene=dict(num_classes=1))
    with pytest.raises(ValueError, match="unknown views preset"):
        ImageNetDataModule(str(scenes.imagenet_root), views="simclr")
    with pytest.raises(ValueError, match="image_filter"):
        COCODataModule(str(scenes.coco_root), image_filter="some")
    with pytest.raises(ValueError, match="split"):
        ImageNetDataModule(str(scenes.imagenet_root)).eval_dataset("test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_images(scenes.imagenet_root / "val")  # hidden entries and class folders walk cleanly
