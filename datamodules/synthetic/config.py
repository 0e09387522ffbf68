"""``SceneConfig``: what the built-in scenes are, and the key of their cache folder."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from .scenes import SHAPES

__all__ = ["SceneConfig", "STYLES", "GENERATOR_VERSION", "spread_colours"]

GENERATOR_VERSION = 5  # bump when the rendering or the layouts change: it is part of the cache key
# style -> (object textures, background textures); None: the renderer's defaults.
STYLES: dict[str, tuple[dict[str, float] | None, dict[str, float] | None]] = {
    "varied": (None, None),  # patterned and smooth fills, every background texture
    "flat": ({"solid": 1.0}, {"solid": 0.4, "gradient": 0.3, "noise": 0.3}),  # solid shapes, smooth backgrounds
}


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

