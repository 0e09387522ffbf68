"""Rendering of synthetic scenes: textured shapes of distinct classes on textured backgrounds.

Every scene draws its colours and textures from one distribution shared by all classes and by the
background, rescales every shape to the same area range whatever its class, and places, rotates and
overlaps the objects at random. So neither colour statistics nor object size nor position tell the class:
only the outline does, and a segmentation has to find the outline against a background of the same kind.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["SHAPES", "TEXTURES", "Scene", "render_scene", "shape_mask"]

# shape name -> inside test in unit coordinates (u to the right, v downwards, the shape within about [-1, 1]^2)
_ShapeTest = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _regular_polygon(sides: int) -> _ShapeTest:
    normals = -math.pi / 2 + math.pi / sides + 2 * math.pi * np.arange(sides) / sides  # a vertex points up
    inradius = math.cos(math.pi / sides)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        support = np.maximum.reduce([u * math.cos(a) + v * math.sin(a) for a in normals])
        return support <= inradius
    return inside


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Star polygon: fold the angle into the half-sector between a tip and an inner vertex, test one edge."""
    sector = 2 * math.pi / points
    angle = np.arctan2(v, u) + math.pi / 2  # a tip points up
    folded = np.abs(np.mod(angle + sector / 2, sector) - sector / 2)
    radius = np.hypot(u, v)
    px, py = radius * np.cos(folded), radius * np.sin(folded)
    tip = (1.0, 0.0)
    notch = (inner * math.cos(sector / 2), inner * math.sin(sector / 2))
    ex, ey = notch[0] - tip[0], notch[1] - tip[1]
    side = ex * (py - tip[1]) - ey * (px - tip[0])
    origin_side = ex * (0 - tip[1]) - ey * (0 - tip[0])
    return side * origin_side >= 0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, -1.15 * v + 0.15
    x2, r = x * x, x * x + y * y - 1
    return r * r * r - x2 * y * y * y <= 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (u >= -1.0) & (u <= 0.05) & (np.abs(v) <= 0.25)
    head = (u >= 0.0) & (u <= 1.0) & (np.abs(v) <= 0.8 * (1.0 - u))
    return shaft | head


_SHAPE_TESTS: dict[str, _ShapeTest] = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": _regular_polygon(3),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 1) & (np.abs(v) <= 0.32)) | ((np.abs(v) <= 1) & (np.abs(u) <= 0.32)),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),
    "hexagon": _regular_polygon(6),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.8 ** 2),
    "heart": _heart,
    "arrow": _arrow,
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_TESTS)


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside test of shape ``name`` at unit coordinates ``(u, v)``."""
    return _SHAPE_TESTS[name](u, v)


@functools.cache
def _unit_area(name: str) -> float:
    """Area of a shape in unit coordinates, to give every class the same pixel area range."""
    axis = np.linspace(-1.3, 1.3, 521)
    u, v = np.meshgrid(axis, axis)
    return float(shape_mask(name, u, v).mean()) * 2.6 ** 2


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` of a ``size x size`` image."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    x, y = np.meshgrid(axis, axis)
    return x, y


# -- textures: a field t in [0, 1] that mixes two colours ----------------------------------------------------

def _rotated(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    angle = rng.uniform(0, math.pi)
    return x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a random ``cells x cells`` grid, bilinearly interpolated to ``size x size``."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


TEXTURES = ("solid", "stripes", "checker", "noise", "gradient", "dots")
# Object fills are mostly smooth: busy patterns inside objects hide their outline (a small CNN trained on
# labels learned half as fast with 25% patterned fills); backgrounds take every texture equally often.
OBJECT_TEXTURES = {"solid": 0.3, "gradient": 0.3, "noise": 0.28, "stripes": 0.06, "checker": 0.06}
BACKGROUND_TEXTURES = {kind: 1 / len(TEXTURES) for kind in TEXTURES}


def _texture(rng: np.random.Generator, size: int, scale: float, kinds: dict[str, float]) -> np.ndarray:
    """A random texture field in [0, 1], its kind drawn from ``kinds`` (name -> probability); ``scale``
    (pixels) sets the size of its pattern."""
    names = list(kinds)
    kind = names[rng.choice(len(names), p=np.array(list(kinds.values())) / sum(kinds.values()))]
    if kind == "solid":
        return np.zeros((size, size), np.float32)
    if kind == "stripes":  # soft or hard
        a, _ = _rotated(rng, size)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * a / (scale * rng.uniform(0.3, 1.0)) + rng.uniform(0, 2 * math.pi))
        return (wave > 0.5).astype(np.float32) if rng.random() < 0.5 else wave
    if kind == "checker":
        a, b = _rotated(rng, size)
        cell = scale * rng.uniform(0.2, 0.6)
        return ((np.floor(a / cell) + np.floor(b / cell)) % 2).astype(np.float32)
    if kind == "noise":  # smooth value noise
        return _smooth_noise(rng, size, max(2, int(size / (scale * rng.uniform(0.3, 1.0)))))
    if kind == "gradient":  # linear
        a, _ = _rotated(rng, size)
        return np.clip((a - a.min()) / max(float(np.ptp(a)), 1e-6), 0, 1)
    a, b = _rotated(rng, size)  # dots
    period = scale * rng.uniform(0.25, 0.6)
    return ((np.sin(2 * math.pi * a / period) * np.sin(2 * math.pi * b / period)) > 0.3).astype(np.float32)


MIN_CONTRAST = 0.35  # RGB distance (in [0, 1] units) an object's colours keep from what lies under it


def _colour(rng: np.random.Generator, palette: np.ndarray | None, avoid: list[np.ndarray] = ()) -> np.ndarray:
    """A random RGB colour in [0, 1] (an entry of ``palette`` ``(P, 3)`` if given) at least ``MIN_CONTRAST``
    away from every colour in ``avoid``; the farthest candidate when none is that far."""
    candidates = rng.random((16, 3), dtype=np.float32) if palette is None else palette[rng.permutation(len(palette))]
    if not avoid:
        return candidates[0]
    distance = np.linalg.norm(candidates[:, None] - np.stack(avoid)[None], axis=-1).min(axis=1)
    far = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[far[0] if len(far) else int(np.argmax(distance))]


def _paint(rng: np.random.Generator, size: int, scale: float, kinds: dict[str, float],
           palette: np.ndarray | None = None, avoid: list[np.ndarray] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured RGB layer ``(size, size, 3)`` mixing two random colours (from ``palette`` if given, away
    from the colours in ``avoid``), and those two colours."""
    t = _texture(rng, size, scale, kinds)[..., None]
    first = _colour(rng, palette, avoid)
    if not t.any():
        return np.broadcast_to(first, (size, size, 3)), [first]
    second = _colour(rng, palette, [*avoid, first])  # a pattern in one colour would be invisible
    return first + (second - first) * t, [first, second]


def _background(rng: np.random.Generator, size: int, kinds: dict[str, float], blob_p: float,
                palette: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured layer (with probability ``blob_p`` a second one shows through in random blobs) and the
    colours it uses."""
    layer, colours = _paint(rng, size, size * rng.uniform(0.1, 0.5), kinds, palette)
    if rng.random() < blob_p:
        blobs = _smooth_noise(rng, size, int(rng.integers(2, 5))) > 0.5
        second, more = _paint(rng, size, size * rng.uniform(0.1, 0.5), kinds, palette)
        layer, colours = np.where(blobs[..., None], second, layer), colours + more
    return layer, colours


# -- scenes ------------------------------------------------------------------------------------------------

@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8.
        classes: class index of every object (index into ``SHAPES``), in drawing order.
        instances: ``(H, W)`` int16, the visible object at each pixel (index into ``classes``), -1 background.
        label: class of the object with the largest visible area.
    """

    image: np.ndarray
    classes: list[int]
    instances: np.ndarray
    label: int


def render_scene(rng: np.random.Generator, size: int, num_classes: int, dominant: int,
                 objects: tuple[int, int] = (1, 3), dominant_area: tuple[float, float] = (0.15, 0.35),
                 other_area: tuple[float, float] = (0.02, 0.06), noise: float = 0.02,
                 object_textures: dict[str, float] | None = None, background_textures: dict[str, float] | None = None,
                 blob_p: float = 0.1, palette: np.ndarray | None = None, max_rotation: float = 180.0,
                 dominant_copies: tuple[int, int] = (1, 1)) -> Scene:
    """One scene: large objects of class ``dominant`` and further smaller objects of other classes.

    Areas are fractions of the image; objects are drawn in a random depth order, so they occlude each
    other, and the label is recomputed from the visible areas. ``noise`` is the standard deviation of the
    pixel noise (in [0, 1] units), ``blob_p`` the probability of a two-layer background. ``palette``
    ``(P, 3)`` restricts every colour (objects and background alike) to P colours; ``max_rotation`` (degrees)
    bounds the objects' random rotation (180: any orientation; 0: upright). Each object's colours keep
    ``MIN_CONTRAST`` from the background's and the earlier objects' colours where the palette allows, so no
    object is invisible. ``dominant_copies`` is the range of the number of ``dominant`` objects, each with
    its own size, place, rotation and colours; the label is the class with the largest visible area.
    """
    object_textures = object_textures or OBJECT_TEXTURES
    background_textures = background_textures or BACKGROUND_TEXTURES
    count = int(rng.integers(objects[0], objects[1] + 1))
    count = min(count, num_classes)
    copies = int(rng.integers(dominant_copies[0], dominant_copies[1] + 1))
    others = rng.permutation([c for c in range(num_classes) if c != dominant])[: count - 1]
    classes = [dominant] * copies + [int(c) for c in others]
    image, used_colours = _background(rng, size, background_textures, blob_p, palette)
    instances = np.full((size, size), -1, np.int16)
    x, y = _grid(size)
    for obj in rng.permutation(len(classes)):
        area_range = dominant_area if obj < copies else other_area
        name = SHAPES[classes[obj]]
        scale = math.sqrt(rng.uniform(*area_range) * size * size / _unit_area(name))  # pixels per unit
        margin = min(0.7 * scale, size / 2)
        cx, cy = rng.uniform(margin, size - margin, 2)
        angle = math.radians(max_rotation) * rng.uniform(-1.0, 1.0)
        cos, sin = math.cos(angle), math.sin(angle)
        u = ((x - cx) * cos + (y - cy) * sin) / scale
        v = (-(x - cx) * sin + (y - cy) * cos) / scale
        inside = shape_mask(name, u, v)
        paint, colours = _paint(rng, size, scale * rng.uniform(0.6, 1.6), object_textures, palette, used_colours)
        used_colours = used_colours + colours
        image = np.where(inside[..., None], paint, image)
        instances[inside] = obj
    image = image + noise * rng.standard_normal(image.shape, dtype=np.float32)
    areas = np.bincount(instances.ravel() + 1, minlength=len(classes) + 1)[1:]
    label = int(np.argmax(np.bincount(classes, weights=areas, minlength=num_classes)))
    return Scene(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), classes, instances, label)
