"""The built-in default data, one unit: scene rendering, its description, the generator of the three
layouts, and the DataModule that reads them.

- ``scenes``: textured shapes on textured backgrounds (:func:`render_scene`), numpy only;
- ``config``: :class:`SceneConfig`, the one description of the data and the key of its cache folder;
- ``layouts``: one scene written as ImageNet, COCO and VOC files; the whole set generated atomically into a
  cache (:func:`ensure_generated`);
- ``datamodule``: :class:`SyntheticScenesDataModule`, built from a ``SceneConfig``, reading the cache
  through the real ``ImageNetDataModule``, ``COCODataModule`` and ``VOCSegmentationDataModule``.
"""
from .config import GENERATOR_VERSION, STYLES, SceneConfig, spread_colours
from .datamodule import SyntheticScenesDataModule
from .layouts import default_cache_root, ensure_generated, generate_scenes, voc_palette
from .scenes import SHAPES, TEXTURES, Scene, render_scene, shape_mask

__all__ = [
    "SyntheticScenesDataModule",
    "SceneConfig",
    "STYLES",
    "GENERATOR_VERSION",
    "generate_scenes",
    "ensure_generated",
    "default_cache_root",
    "voc_palette",
    "spread_colours",
    "render_scene",
    "shape_mask",
    "Scene",
    "SHAPES",
    "TEXTURES",
]
