"""The built-in scenes written in three real layouts, generated once into a cache folder.

The same scenes are written as

- ``imagenet/{train,val}/<NN_shape>/*.JPEG`` — labelled by the largest visible object,
- ``coco/{train2017,val2017}/*.jpg`` + ``coco/annotations/instances_*.json`` — instance boxes, RLE masks,
- ``voc/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` — palette PNG masks (0 background,
  1..C the shapes, 255 on object borders as in VOC),

so that ``SyntheticScenesDataModule`` reads them back through the real loaders of those layouts.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from .config import GENERATOR_VERSION, STYLES, SceneConfig
from .scenes import SHAPES, Scene, render_scene

__all__ = ["generate_scenes", "ensure_generated", "default_cache_root", "voc_palette"]

_SPLITS = {"train": ("train", "train2017"), "val": ("val", "val2017")}  # split -> (imagenet/voc name, coco name)


def default_cache_root() -> Path:
    """``$SSL_MODULES_DATA/synthetic`` if set, else ``~/.cache/ssl_modules/synthetic``."""
    base = os.environ.get("SSL_MODULES_DATA")
    return Path(base) / "synthetic" if base else Path.home() / ".cache" / "ssl_modules" / "synthetic"


@functools.cache
def voc_palette() -> tuple[int, ...]:
    """VOC's 256-colour palette (768 values): the bits of the index spread over r, g, b from the top bit down."""
    palette = []
    for index in range(256):
        rgb, code = [0, 0, 0], index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        palette += rgb
    return tuple(palette)


# -- one image in the three layouts ---------------------------------------------------------------------------

def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _semantic_mask(scene: Scene) -> np.ndarray:
    """VOC mask: 0 background, class + 1 on objects, 255 on the pixels where two regions meet."""
    lookup = np.array([c + 1 for c in scene.classes] + [0], np.uint8)
    mask = lookup[scene.instances]  # instance -1 indexes the trailing 0
    padded = np.pad(scene.instances, 1, mode="edge")
    inner = padded[1:-1, 1:-1]
    border = ((padded[:-2, 1:-1] != inner) | (padded[2:, 1:-1] != inner)
              | (padded[1:-1, :-2] != inner) | (padded[1:-1, 2:] != inner))
    mask[border] = 255
    return mask


def _rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.int8)
    starts = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0] + counts if flat[0] else counts


def _coco_annotations(scene: Scene, image_id: int) -> list[dict[str, Any]]:
    annotations = []
    for obj, cls in enumerate(scene.classes):
        visible = scene.instances == obj
        if not visible.any():  # fully occluded
            continue
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        x0, y0 = int(cols[0]), int(rows[0])
        annotations.append(dict(
            image_id=image_id, category_id=cls + 1, iscrowd=0, area=int(visible.sum()),
            bbox=[x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
            segmentation=dict(size=list(visible.shape), counts=_rle(visible)),
        ))
    return annotations


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_image(config: SceneConfig, folder: Path, split: str, index: int) -> dict[str, Any]:
    """Render image ``index`` of ``split``, write it into the three layouts, return its COCO records."""
    rng = np.random.default_rng([config.seed, 0 if split == "train" else 1, index])
    object_textures, background_textures = STYLES[config.style]
    scene = render_scene(rng, config.image_size, config.num_classes, dominant=index % config.num_classes,
                         objects=config.objects, object_textures=object_textures,
                         background_textures=background_textures, palette=config.palette(),
                         max_rotation=config.max_rotation, dominant_area=config.dominant_area,
                         other_area=config.other_area, dominant_copies=config.dominant_copies)
    name, coco_split = _SPLITS[split]
    stem = f"{split}_{index:06d}"
    image_id = index + 1 + (0 if split == "train" else 10_000_000)
    jpeg = folder / "imagenet" / name / config.class_folders()[scene.label] / f"{stem}.JPEG"
    jpeg.write_bytes(_encode(Image.fromarray(scene.image), "JPEG", quality=90))
    _link_or_copy(jpeg, folder / "coco" / coco_split / f"{image_id:012d}.jpg")
    _link_or_copy(jpeg, folder / "voc" / "VOC2012" / "JPEGImages" / f"{stem}.jpg")
    mask = Image.fromarray(_semantic_mask(scene))
    mask.putpalette(voc_palette())  # an "L" image with a palette becomes "P": indices kept
    (folder / "voc" / "VOC2012" / "SegmentationClass" / f"{stem}.png").write_bytes(_encode(mask, "PNG"))
    size = config.image_size
    return dict(image=dict(id=image_id, file_name=f"{image_id:012d}.jpg", height=size, width=size),
                annotations=_coco_annotations(scene, image_id), stem=stem)


def _write_range(config: SceneConfig, folder: Path, split: str, start: int, stop: int) -> list[dict[str, Any]]:
    return [_write_image(config, folder, split, index) for index in range(start, stop)]


def _make_folders(config: SceneConfig, folder: Path) -> None:
    for name, coco_split in _SPLITS.values():
        for class_folder in config.class_folders():
            (folder / "imagenet" / name / class_folder).mkdir(parents=True)
        (folder / "coco" / coco_split).mkdir(parents=True)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / "voc" / "VOC2012" / sub).mkdir(parents=True)
    (folder / "coco" / "annotations").mkdir(parents=True)


def _write_split_index(config: SceneConfig, folder: Path, split: str, records: list[dict[str, Any]]) -> None:
    """The split's COCO json and VOC id list."""
    categories = [dict(id=c + 1, name=SHAPES[c], supercategory="shape") for c in range(config.num_classes)]
    annotations = [a for r in records for a in r["annotations"]]
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    coco = dict(info=dict(description="ssl_modules synthetic scenes", version=GENERATOR_VERSION),
                images=[r["image"] for r in records], annotations=annotations, categories=categories)
    (folder / "coco" / "annotations" / f"instances_{_SPLITS[split][1]}.json").write_text(json.dumps(coco))
    ids = "".join(f"{r['stem']}\n" for r in records)
    (folder / "voc" / "VOC2012" / "ImageSets" / "Segmentation" / f"{_SPLITS[split][0]}.txt").write_text(ids)


def generate_scenes(config: SceneConfig, folder: Path, workers: int = 1) -> None:
    """Write the data set of ``config`` into the new folder ``folder`` (in ``workers`` processes)."""
    _make_folders(config, folder)
    for split, count in (("train", config.num_train), ("val", config.num_val)):
        chunk = max(1, -(-count // max(1, 4 * workers)))
        bounds = [(start, min(start + chunk, count)) for start in range(0, count, chunk)]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                parts = pool.map(_write_range, *zip(*[(config, folder, split, a, b) for a, b in bounds]))
                records = [r for part in parts for r in part]
        else:
            records = [r for a, b in bounds for r in _write_range(config, folder, split, a, b)]
        _write_split_index(config, folder, split, records)
    (folder / "params.json").write_text(json.dumps({**asdict(config), "version": GENERATOR_VERSION}, indent=1))


def ensure_generated(config: SceneConfig, root: Path, workers: int = 1) -> Path:
    """The cache folder of ``config`` under ``root``, generated first if missing.

    Generation writes into a temporary sibling folder that is renamed into place at the end (atomic), so an
    interrupted run never leaves a half-written cache, and concurrent runs keep whichever finished first.
    """
    target = root / config.key()
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".tmp-{config.key()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        generate_scenes(config, temporary, workers)
        try:
            os.rename(temporary, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    rank_zero_info(f"Generated {config.num_train} + {config.num_val} synthetic scenes in {target} "
                   f"({time.perf_counter() - start:.1f} s)")
    return target
