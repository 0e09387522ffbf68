"""``SyntheticScenesDataModule``: the built-in data, described by a ``SceneConfig`` and read through the
ImageNet, COCO and VOC DataModules from the cache folder the generator writes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from ..base import ClassificationDataMixin, ImageList, PretrainDataModule
from ..coco import COCODataModule
from ..imagenet import ImageNetDataModule
from ..views import MultiCropViews
from ..voc import VOCSegmentationDataModule
from .config import SceneConfig
from .layouts import default_cache_root, ensure_generated
from .scenes import SHAPES

__all__ = ["SyntheticScenesDataModule"]

DEFAULT_SCENE = SceneConfig()  # frozen: one shared default is safe


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
        scene: SceneConfig = DEFAULT_SCENE,
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
