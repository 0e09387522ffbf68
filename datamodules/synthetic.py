"""``SyntheticScenesDataModule``: the built-in data, generated once into a cache in three real layouts.

The generator (``datamodules/scenes.py``) writes the same scenes as

- ``imagenet/{train,val}/<NN_shape>/*.JPEG`` — labelled by the largest visible object,
- ``coco/{train2017,val2017}/*.jpg`` + ``coco/annotations/instances_*.json`` — instance boxes, RLE masks,
- ``voc/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` — palette PNG masks (0 background,
  1..C the shapes, 255 on object borders as in VOC),

and the DataModule reads them back through ``ImageNetDataModule``, ``COCODataModule`` and
``VOCSegmentationDataModule``, so the synthetic data exercises the real loaders.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset

from .base import ClassificationDataMixin, ImageList, PretrainDataModule
from .coco import COCODataModule
from .imagenet import ImageNetDataModule
from .scenes import SHAPES, Scene, render_scene
from .views import MultiCropViews
from .voc import VOCSegmentationDataModule

__all__ = ["SyntheticScenesDataModule", "SceneConfig", "generate_scenes", "default_cache_root", "voc_palette"]

GENERATOR_VERSION = 5  # bump when the rendering or the layouts change: it is part of the cache key
# style -> (object textures, background textures); None: the renderer's defaults.
STYLES: dict[str, tuple[dict[str, float] | None, dict[str, float] | None]] = {
    "varied": (None, None),  # patterned and smooth fills, every background texture
    "flat": ({"solid": 1.0}, {"solid": 0.4, "gradient": 0.3, "noise": 0.3}),  # solid shapes, smooth backgrounds
}
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


@dataclass(frozen=True)
class SceneConfig:
    """What the generated scenes depend on (and so the key of their cache folder): the one description of the
    data, given to ``SyntheticScenesDataModule(scene=...)`` (in YAML: ``scene: {image_size: 48, ...}``).

    Attributes:
        image_size: side of the square images in pixels (at least 16).
        num_classes: number of shape classes (2 to 10).
        num_train: training images.
        num_val: validation images.
        objects: range ``(min, max)`` of the number of objects (of distinct classes) in an image.
        seed: seed of the generator; the same parameters give the same bytes.
        style: ``"varied"`` (patterned and smooth fills on every kind of background texture) or ``"flat"``
            (solid shapes on smooth backgrounds: easier to learn in a short run).
        palette_size: draw every colour (objects and backgrounds alike) from this many seeded colours;
            ``None``: any colour. Either way colour says nothing about the class.
        max_rotation: objects are rotated uniformly within +-``max_rotation`` degrees (180: any orientation).
        dominant_area: range of the labelled (largest) object's area, as a fraction of the image; smaller
            objects on a larger canvas move further, so raw pixels match less and learning must generalise.
        other_area: range of the further objects' areas.
        dominant_copies: range of the number of objects of the labelled class, each with its own place, size,
            rotation and colours: with several, raw pixels rarely line up between two images of a class,
            while a crop almost always shows one of them.
    """

    image_size: int = 96
    num_classes: int = 10
    num_train: int = 4000
    num_val: int = 500
    objects: tuple[int, int] = (1, 3)
    seed: int = 0
    style: Literal["varied", "flat"] = "varied"
    palette_size: int | None = None
    max_rotation: float = 180.0
    dominant_area: tuple[float, float] = (0.15, 0.35)
    other_area: tuple[float, float] = (0.02, 0.06)
    dominant_copies: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        for name in ("objects", "dominant_area", "other_area", "dominant_copies"):  # YAML gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r}; use one of {sorted(STYLES)}")
        if self.palette_size is not None and self.palette_size < 2:
            raise ValueError(f"palette_size={self.palette_size} must be at least 2 (or None for any colour)")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation={self.max_rotation} must lie in [0, 180] degrees")
        for name in ("dominant_area", "other_area"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"{name}={(low, high)} must be a range of image fractions with 0 < min <= max < 1")
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes={self.num_classes} must lie in [2, {len(SHAPES)}] (the shapes {SHAPES})")
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size} is too small to draw shapes; use at least 16")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train={self.num_train} and num_val={self.num_val} must be at least 1")
        for name in ("objects", "dominant_copies"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}={(low, high)} must be a range (min, max) with 1 <= min <= max")

    def key(self) -> str:
        """A readable, unique folder name for these parameters."""
        params = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha1(params.encode()).hexdigest()[:10]
        return f"scenes-{self.image_size}px-{self.num_classes}c-{self.num_train}+{self.num_val}-{digest}"

    def palette(self) -> np.ndarray | None:
        """The ``palette_size`` colours every scene draws from (seeded, far apart), or None for any colour."""
        if self.palette_size is None:
            return None
        return _seeded_palette(self.seed, self.palette_size)

    def class_folders(self) -> list[str]:
        return [f"{c:02d}_{SHAPES[c]}" for c in range(self.num_classes)]


@functools.cache
def _seeded_palette(seed: int, count: int) -> np.ndarray:
    """Computed once per process: every image of a generation run asks for it."""
    palette = spread_colours(np.random.default_rng([seed, 2]), count)
    palette.flags.writeable = False
    return palette


def spread_colours(rng: np.random.Generator, count: int, candidates: int = 512) -> np.ndarray:
    """``count`` RGB colours ``(count, 3)`` in [0, 1], picked one by one from random candidates as the one
    farthest from those already picked, so that no two palette entries look alike."""
    pool = rng.random((candidates, 3), dtype=np.float32)
    picked = [0]
    distance = np.linalg.norm(pool - pool[0], axis=1)
    for _ in range(count - 1):
        picked.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(pool - pool[picked[-1]], axis=1))
    return pool[picked]


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


class SyntheticScenesDataModule(ClassificationDataMixin, PretrainDataModule):
    """Built-in scene-centric data: textured shapes of ``scene.num_classes`` classes on textured backgrounds.

    Generated once (in ``prepare_data``, or in ``setup`` if missing) into ``root/<key of the parameters>`` in
    the ImageNet, COCO and VOC layouts, and read through the real DataModules of those layouts. Pretraining
    reads ``layout``; the classification probes read the ImageNet layout (label: the largest visible object),
    the segmentation probes the VOC layout (``scene.num_classes + 1`` classes, 0 background, 255 borders).

    Colours and textures come from one distribution for every class and the background, and every shape
    gets the same area range, so only shape identifies a class (a colour-histogram classifier is at chance).

    Args:
        root: cache folder; default ``$SSL_MODULES_DATA/synthetic`` or ``~/.cache/ssl_modules/synthetic``.
        layout: what pretraining reads: ``"imagenet"``, ``"coco"`` or ``"voc"``.
        scene: what the scenes are (:class:`SceneConfig`: size, classes, counts, style, object areas, seed);
            a dict of its fields is taken too.
        generation_workers: processes that generate the data.
        views: the multi-crop transform or a preset name; a preset gets the crop sizes ``crop_sizes``.
        crop_sizes: ``(global, local)`` crop sides applied to a preset name (suits the small images).
        eval_size: side of the probes' images.
        **kwargs: further loader arguments of ``PretrainDataModule`` (``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        layout: Literal["imagenet", "coco", "voc"] = "imagenet",
        scene: SceneConfig = SceneConfig(),
        generation_workers: int = 2,
        views: MultiCropViews | str = "cribo",
        crop_sizes: tuple[int, int] = (64, 32),
        eval_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if isinstance(views, str):
            views = MultiCropViews.preset(views, global_size=crop_sizes[0], local_size=crop_sizes[1])
        super().__init__(views=views, eval_size=eval_size, **kwargs)
        if layout not in ("imagenet", "coco", "voc"):
            raise ValueError(f"layout={layout!r}; use 'imagenet', 'coco' or 'voc'")
        if isinstance(scene, dict):
            scene = SceneConfig(**scene)
        if not isinstance(scene, SceneConfig):
            raise TypeError(f"scene must be a SceneConfig (or a dict of its fields), got {type(scene).__name__}")
        self.config = scene
        self.cache_root = Path(root).expanduser() if root is not None else default_cache_root()
        self.layout, self.generation_workers = layout, generation_workers
        self._loader_kwargs = dict(kwargs, views=self.views, eval_size=eval_size)
        self._readers: dict[str, PretrainDataModule] = {}

    @property
    def scene(self) -> SceneConfig:
        """The scenes' description (also ``config``)."""
        return self.config

    # -- where the data is ------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The cache folder of these parameters."""
        return self.cache_root / self.config.key()

    @property
    def imagenet_root(self) -> Path:
        return self.data_dir / "imagenet"

    @property
    def coco_root(self) -> Path:
        return self.data_dir / "coco"

    @property
    def voc_root(self) -> Path:
        return self.data_dir / "voc"

    def prepare_data(self) -> None:
        """Generate the data unless the cache already has it (Lightning calls this on one process per node)."""
        ensure_generated(self.config, self.cache_root, self.generation_workers)

    def setup(self, stage: str | None = None) -> None:
        if not self.data_dir.is_dir():  # used without a Trainer: generate here (atomic, so safe)
            self.prepare_data()
        super().setup(stage)

    def _reader(self, layout: str) -> PretrainDataModule:
        """The real DataModule of ``layout`` over the generated files."""
        if layout not in self._readers:
            if not self.data_dir.is_dir():
                self.prepare_data()
            kinds = {"imagenet": (ImageNetDataModule, self.imagenet_root), "coco": (COCODataModule, self.coco_root),
                     "voc": (VOCSegmentationDataModule, self.voc_root)}
            kind, root = kinds[layout]
            extra = dict(num_seg_classes=self.num_seg_classes) if layout == "voc" else {}
            self._readers[layout] = kind(root=str(root), **extra, **self._loader_kwargs)
        return self._readers[layout]

    # -- pretraining and the probe-data protocol --------------------------------------------------------------

    def train_images(self) -> ImageList:
        return self._reader(self.layout).train_images()

    def eval_images(self, split: str) -> ImageList:
        reader = self._reader("imagenet")
        assert isinstance(reader, ImageNetDataModule)
        return reader.eval_images(split)

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES[: self.config.num_classes])

    @property
    def num_seg_classes(self) -> int:
        """Classes of the segmentation masks: background + the shapes."""
        return self.config.num_classes + 1

    def segmentation_dataset(self, split: str, size: int | None = None) -> Dataset:
        """``(float normalised image (3, S, S), LongTensor mask (S, S))`` pairs from the VOC layout."""
        reader = self._reader("voc")
        assert isinstance(reader, VOCSegmentationDataModule)
        return reader.segmentation_dataset(split, size)
