"""Multi-crop views with the geometry of every crop (the training batch of every pretraining DataModule).

``MultiCropViews`` turns one uint8 image into ``n_global`` large and ``n_local`` small crops, each with its
box in the image and its flip flag (a ``ViewSample``); ``collate_views`` stacks samples into the ``Views``
batch of ``docs/architecture.md``. Crops stay uint8 through the loader; ``Views.normalized()`` (called by the
DataModules' ``on_after_batch_transfer``, i.e. on the training device) turns them into normalised floats.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from ssl_modules.contracts import Views  # the batch contract (torch only; re-exported here)

from . import colour
from .transforms import interpolation_mode, normalize_uint8

__all__ = ["Views", "ViewSample", "MultiCropViews", "CropSpec", "PRESETS", "collate_views", "contrastive_crop_params",
           "check_guide_boxes", "random_resized_crop_params", "color_jitter_params", "item_generator", "UniformDraw"]

#: ``(low, high, generator) -> float``: one uniform draw in ``[low, high)``.
UniformDraw = Callable[[float, float, torch.Generator | None], float]


class ViewSample(NamedTuple):
    """The views of one image, as ``MultiCropViews`` returns them.

    Attributes:
        crops: V uint8 tensors ``(3, size_v, size_v)``, global crops first.
        boxes: ``(V, 4)`` float, normalised ``(y0, x0, y1, x1)`` of each crop in the image.
        flipped: ``(V,)`` bool.
        image_size: ``(2,)`` float, the image's ``(height, width)`` in pixels.
    """

    crops: list[Tensor]
    boxes: Tensor
    flipped: Tensor
    image_size: Tensor


@dataclass(frozen=True)
class CropSpec:
    """The recipe of one view: its output size, its crop scale range and its own blur/solarisation odds."""

    group: str
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


# The papers' recipes (CrIBo and BAM: DINO's pipeline; VICRegL: its official transforms.py). Per-view probabilities are
# patterns cycled over the views of a group, so overriding n_local keeps each recipe's alternation.
_COLOUR_CRIBO = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                     global_blur_p=(1.0, 0.1), global_solarize_p=(0.0, 0.2))
PRESETS: dict[str, dict[str, Any]] = {
    # CrIBo: DINO's asymmetric global pair, no local crops.
    "cribo": dict(n_global=2, n_local=0, global_size=224, global_scale=(0.25, 1.0), **_COLOUR_CRIBO),
    # BAM: DINO's pipeline; saturation jitter 0.4; local crops blurred with p 0.5, never solarised.
    "bam": dict(n_global=2, n_local=6, global_size=224, local_size=96, global_scale=(0.25, 1.0),
                local_scale=(0.05, 0.25), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
                global_blur_p=(1.0, 0.1), global_solarize_p=(0.0, 0.2), local_blur_p=(0.5,),
                local_solarize_p=(0.0,)),
    # VICRegL ResNet-50: two 224 crops of scale (0.08, 1).
    "vicregl_resnet": dict(n_global=2, n_local=0, global_size=224, global_scale=(0.08, 1.0), **_COLOUR_CRIBO),
    # VICRegL ConvNeXt: 2 x 224 (0.4, 1) + 6 x 96 (0.08, 0.4); blur/solarisation alternate in each group.
    "vicregl_convnext": dict(n_global=2, n_local=6, global_size=224, local_size=96, global_scale=(0.4, 1.0),
                             local_scale=(0.08, 0.4), local_blur_p=(1.0, 0.1), local_solarize_p=(0.0, 0.2),
                             **_COLOUR_CRIBO),
}


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is not a probability; use a value in [0, 1]")


def _check_probabilities(name: str, values: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one probability (cycled over the group's views)")
    for i, value in enumerate(values):
        _check_probability(f"{name}[{i}]", value)
    return values


def _check_scale(name: str, scale: Sequence[float], example: str) -> tuple[float, float]:
    if len(scale) != 2:
        raise ValueError(f"{name}={tuple(scale)} must be a pair (min, max), e.g. {example}")
    low, high = float(scale[0]), float(scale[1])
    if not (0.0 < low <= 1.0 and 0.0 < high <= 1.0):
        raise ValueError(f"{name}={(low, high)}: area fractions must lie in (0, 1]; e.g. {example}")
    if low > high:
        raise ValueError(f"{name}={(low, high)}: the minimum exceeds the maximum; swap them to {(high, low)}")
    return low, high


def _check_positive_pair(name: str, pair: Sequence[float], example: str) -> tuple[float, float]:
    if len(pair) != 2:
        raise ValueError(f"{name}={tuple(pair)} must be a pair (min, max), e.g. {example}")
    low, high = float(pair[0]), float(pair[1])
    if not 0.0 < low <= high:
        raise ValueError(f"{name}={(low, high)} must satisfy 0 < min <= max, e.g. {example}")
    return low, high


def check_guide_boxes(boxes: Tensor, num_images: int | None = None) -> Tensor:
    """``boxes`` as a float32 ``(N, 4)`` CPU table of normalised ``(y0, x0, y1, x1)`` guide boxes, or a
    ``ValueError`` saying what is wrong. A row of NaN (all four) means "no guide" for that image."""
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"crop guides must be a (num_images, 4) tensor of (y0, x0, y1, x1) boxes, got {shape}")
    if num_images is not None and boxes.shape[0] != num_images:
        raise ValueError(f"{boxes.shape[0]} crop guides for {num_images} training images: give one box per image, "
                         "in the order of the training set")
    boxes = boxes.detach().to("cpu", torch.float32)
    unguided = boxes.isnan().all(dim=1)
    given = boxes[~unguided]
    if given.isnan().any():
        raise ValueError("crop guides: a box is partly NaN; give four numbers, or four NaN for 'no guide'")
    if given.numel() and (given.min() < 0 or given.max() > 1):
        raise ValueError("crop guides must be normalised to [0, 1] (fractions of the image height and width), got "
                         f"values in [{given.min().item():.3g}, {given.max().item():.3g}]")
    if (given[:, 2] < given[:, 0]).any() or (given[:, 3] < given[:, 1]).any():
        raise ValueError("crop guides must be (y0, x0, y1, x1) with y0 <= y1 and x0 <= x1")
    return boxes


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """One draw uniform in ``[low, high)`` from ``generator`` (the global RNG for ``None``)."""
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _bernoulli(p: float, generator: torch.Generator | None) -> bool:
    """True with probability ``p``."""
    return bool(torch.rand((), generator=generator) < p)


def _beta_pair(alpha: float, generator: torch.Generator | None) -> list[float]:
    """Two independent ``Beta(alpha, alpha)`` draws; numpy's Beta sampler, seeded from ``generator``
    (torch's own Beta sampler cannot take a generator)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return np.random.default_rng(seed).beta(alpha, alpha, size=2).tolist()


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               generator: torch.Generator | None = None,
                               uniform: UniformDraw = _uniform) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)`` (torchvision's algorithm: area fraction uniform in
    ``scale``, log-uniform aspect ratio in ``ratio``, 10 tries, then a centre crop), drawn from ``generator``.

    ``uniform`` draws the area fraction and the log aspect ratio; the default rounds each draw to float32 (as
    torch's ``uniform_``). The evaluation protocols pass their own float64 draw, which their numbers were
    measured with; both consume the generator alike.
    """
    size = _random_crop_size(height, width, scale, ratio, generator, uniform)
    if size is None:
        return _centre_fallback(height, width, ratio)
    h, w = size
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    return top, left, h, w


def _random_crop_size(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator | None, uniform: UniformDraw) -> tuple[int, int] | None:
    """The ``(h, w)`` of RandomResizedCrop's first admissible try of 10, or None."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1], generator)
        aspect = math.exp(uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    return None


def _centre_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback: the largest centred box of an admissible aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter_params(jitter: tuple[float, float, float, float],
                        generator: torch.Generator | None = None) -> dict[str, Any]:
    """ColorJitter's random order and factors (torchvision's rule: brightness/contrast/saturation factors
    uniform in ``[max(0, 1 - s), 1 + s]``, hue uniform in ``[-h, h]``; a zero strength disables that op),
    drawn from ``generator``, in the format of ``colour.color_jitter``."""
    order = torch.randperm(4, generator=generator)
    factors = []
    for index, strength in enumerate(jitter):
        if strength == 0:
            factors.append(None)
        elif index == 3:
            factors.append(_uniform(-strength, strength, generator))
        else:
            factors.append(_uniform(max(0.0, 1.0 - strength), 1.0 + strength, generator))
    brightness, contrast, saturation, hue = factors
    return dict(fn_idx=order, brightness_factor=brightness, contrast_factor=contrast,
                saturation_factor=saturation, hue_factor=hue)


def _guided_edge(side: int, length: int, low: float, high: float, u: float) -> int:
    """The first pixel of a crop of ``length`` in ``side`` whose centre runs from ``low`` to ``high`` (fractions)."""
    start = min(max(int(side * low) - length // 2, 0), side - length)
    end = min(max(int(side * high) - length // 2, 0), side - length)
    return start + int((end - start) * u)


def contrastive_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    guide: Sequence[float],
    alpha: float = 0.6,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """ContrastiveCrop's crop ``(top, left, h, w)`` in an image of ``height x width`` pixels (``docs/bam.md``).

    The size is RandomResizedCrop's: area fraction uniform in ``scale``, aspect ratio (w / h) log-uniform in
    ``ratio``, up to 10 tries, then a centre crop (of the whole image, or of the largest box of an admissible
    ratio). The position follows the guide box ``(y0, x0, y1, x1)`` (normalised): the top edge runs from
    ``int(height * y0) - h // 2`` to ``int(height * y1) - h // 2`` (both clamped to ``[0, height - h]``), and is
    ``start + int((end - start) * u)`` with ``u ~ Beta(alpha, alpha)``; the left edge the same way with its
    own draw; every draw comes from ``generator`` (the global RNG for None). So the crop's centre lies in the
    box (to a pixel) unless the crop is pushed in from the image
    border; ``alpha < 1`` favours the box sides.
    """
    size = _random_crop_size(height, width, scale, ratio, generator, _uniform)
    if size is None:
        return _centre_fallback(height, width, ratio)
    h, w = size
    y0, x0, y1, x1 = (float(v) for v in guide)
    u_top, u_left = _beta_pair(alpha, generator)
    return _guided_edge(height, h, y0, y1, u_top), _guided_edge(width, w, x0, x1, u_left), h, w


class MultiCropViews:
    """Multi-crop augmentation that records where every crop came from.

    Each of the ``n_global`` large and ``n_local`` small crops is drawn independently by the RandomResizedCrop
    algorithm (area fraction uniform in the group's scale range, log-uniform aspect ratio in ``ratio``, 10
    tries then a centre-crop fallback), resized with ``interpolation`` (antialiased; images smaller than the
    crop are upsampled), flipped horizontally with probability ``flip_p``, then coloured on its own: colour
    jitter with ``jitter_p`` (the four factors in a random order), grayscale with ``grayscale_p``, Gaussian
    blur (sigma uniform in ``blur_sigma`` pixels) and solarisation with the view's own probabilities.

    Per-view probabilities are patterns cycled over the views of a group: ``global_blur_p=(1.0, 0.1)`` blurs
    global view 0 always and global view 1 with p 0.1 (BYOL's asymmetric pair). Paper recipes:
    ``MultiCropViews.preset("cribo" | "bam" | "vicregl_resnet" | "vicregl_convnext", **overrides)``.

    Works on uint8 tensors and returns uint8 crops (normalise with ``Views.normalized``).

    ContrastiveCrop (BAM, ``docs/bam.md``): called with a ``guide`` box, every crop keeps its
    RandomResizedCrop size but is placed around the box (``contrastive_crop_params``); the global crops then
    use the scale range ``(global_scale[0], 1)``, the local ones ``local_scale``. The recorded boxes are the
    crops' true boxes either way. The training data set passes the guides (``MultiCropImages.set_crop_guides``).

    Args:
        n_global: number of large crops (at least 1); they come first.
        n_local: number of small crops.
        global_size: side of the large crops in pixels.
        local_size: side of the small crops in pixels.
        global_scale: range of the area fraction of the image covered by a large crop, in (0, 1].
        local_scale: the same for the small crops.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        interpolation: ``"bicubic"`` (all three papers), ``"bilinear"`` or ``"nearest"``.
        flip_p: probability of a horizontal flip of each crop.
        jitter: colour-jitter strengths ``(brightness, contrast, saturation, hue)``; hue at most 0.5.
        jitter_p: probability of applying the colour jitter to a crop.
        grayscale_p: probability of turning a crop gray.
        global_blur_p: Gaussian-blur probabilities, cycled over the large crops.
        local_blur_p: Gaussian-blur probabilities, cycled over the small crops.
        global_solarize_p: solarisation probabilities, cycled over the large crops.
        local_solarize_p: solarisation probabilities, cycled over the small crops.
        blur_sigma: range of the blur's standard deviation in pixels (PIL's radius in the papers).
        solarize_threshold: pixels at or above it (0-255) are inverted.
    """

    def __init__(
        self,
        n_global: int = 2,
        n_local: int = 0,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        global_blur_p: Sequence[float] = (1.0, 0.1),
        local_blur_p: Sequence[float] = (0.5,),
        global_solarize_p: Sequence[float] = (0.0, 0.2),
        local_solarize_p: Sequence[float] = (0.0,),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_threshold: int = 128,
    ) -> None:
        if n_global < 1:
            raise ValueError(f"n_global={n_global}: at least one global crop is needed; set n_global >= 1")
        if n_local < 0:
            raise ValueError(f"n_local={n_local} is negative; use 0 for no local crops")
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size < 1:
                raise ValueError(f"{name}={size}: a crop needs at least 1 pixel; use e.g. 224 / 96 (32 / 16 on CPU)")
        self.global_scale = _check_scale("global_scale", global_scale, "(0.25, 1.0)")
        self.local_scale = _check_scale("local_scale", local_scale, "(0.05, 0.25)")
        self.ratio = _check_positive_pair("ratio", ratio, "(3 / 4, 4 / 3)")
        self.blur_sigma = _check_positive_pair("blur_sigma", blur_sigma, "(0.1, 2.0)")
        self.interpolation = interpolation
        self.mode = interpolation_mode(interpolation)
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p)):
            _check_probability(name, p)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter={tuple(jitter)} must be 4 non-negative strengths (brightness, contrast, "
                             "saturation, hue) with hue <= 0.5, e.g. (0.4, 0.4, 0.2, 0.1)")
        if not 0 <= solarize_threshold <= 255:
            raise ValueError(f"solarize_threshold={solarize_threshold} must be a pixel value in [0, 255]")
        self.n_global, self.n_local = n_global, n_local
        self.global_size, self.local_size = global_size, local_size
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.jitter = tuple(float(j) for j in jitter)
        self.solarize_threshold = solarize_threshold
        self.global_blur_p = _check_probabilities("global_blur_p", global_blur_p)
        self.local_blur_p = _check_probabilities("local_blur_p", local_blur_p)
        self.global_solarize_p = _check_probabilities("global_solarize_p", global_solarize_p)
        self.local_solarize_p = _check_probabilities("local_solarize_p", local_solarize_p)
        self.specs = self._build_specs()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MultiCropViews:
        """A paper's recipe (``"cribo"``, ``"bam"``, ``"vicregl_resnet"``, ``"vicregl_convnext"``) with overrides.

        Example: ``MultiCropViews.preset("bam", global_size=32, local_size=16)`` for a CPU run.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown views preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def _build_specs(self) -> list[CropSpec]:
        specs = []
        for group, count, size, scale, blur, solarize in (
            ("global", self.n_global, self.global_size, self.global_scale, self.global_blur_p,
             self.global_solarize_p),
            ("local", self.n_local, self.local_size, self.local_scale, self.local_blur_p, self.local_solarize_p),
        ):
            for i in range(count):
                specs.append(CropSpec(group, size, scale, blur[i % len(blur)], solarize[i % len(solarize)]))
        return specs

    @property
    def num_views(self) -> int:
        return len(self.specs)

    @property
    def sizes(self) -> list[int]:
        """Output side of every view, global views first."""
        return [spec.size for spec in self.specs]

    def __call__(self, image: Tensor, guide: Sequence[float] | Tensor | None = None, alpha: float = 0.6,
                 generator: torch.Generator | None = None) -> ViewSample:
        """uint8 image ``(3, H, W)`` -> its views with boxes, flip flags and the image size.

        Every random choice (crop boxes, flips, colour factors and order, blur sigma, the per-view odds) is
        drawn from ``generator``, in a fixed order: the same generator state gives the same views, whatever
        process runs the call. ``None`` draws from the process's global RNG.

        Args:
            image: uint8 RGB ``(3, H, W)``.
            guide: ContrastiveCrop's box ``(y0, x0, y1, x1)`` (normalised) to draw the crops around; ``None``
                (or NaN) gives RandomResizedCrop.
            alpha: parameter of the ``Beta(alpha, alpha)`` position draw of ContrastiveCrop.
        """
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise TypeError(f"MultiCropViews expects a uint8 RGB image (3, H, W); got {image.dtype} "
                            f"{tuple(image.shape)} (datamodules.reading.read_image gives one)")
        if guide is not None:
            guide = [float(v) for v in (guide.tolist() if isinstance(guide, Tensor) else guide)]
            if len(guide) != 4:
                raise ValueError(f"a crop guide is one box (y0, x0, y1, x1), got {len(guide)} numbers")
            if any(math.isnan(v) for v in guide):
                guide = None
            elif alpha <= 0:
                raise ValueError(f"alpha={alpha}: the Beta(alpha, alpha) of ContrastiveCrop needs alpha > 0 "
                                 "(0.6 in BAM)")
        crops, boxes, flips = [], [], []
        for spec in self.specs:
            crop, box, flipped = self.crop(image, spec, guide, alpha, generator)
            crops.append(self.colour(crop, spec, generator))
            boxes.append(box)
            flips.append(flipped)
        height, width = image.shape[-2:]
        return ViewSample(crops, torch.stack(boxes), torch.tensor(flips), torch.tensor([float(height), float(width)]))

    def crop(self, image: Tensor, spec: CropSpec, guide: Sequence[float] | None = None,
             alpha: float = 0.6, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, bool]:
        """RandomResizedCrop (ContrastiveCrop around ``guide`` if given) + flip of one view: the crop, its
        normalised box ``(y0, x0, y1, x1)`` in the image, the flip flag."""
        height, width = image.shape[-2:]
        if guide is None:
            top, left, h, w = random_resized_crop_params(height, width, spec.scale, self.ratio, generator)
        else:
            scale = (spec.scale[0], 1.0) if spec.group == "global" else spec.scale
            top, left, h, w = contrastive_crop_params(height, width, scale, self.ratio, guide, alpha, generator)
        crop = F.resized_crop(image, top, left, h, w, [spec.size, spec.size], interpolation=self.mode,
                              antialias=True)
        flipped = _bernoulli(self.flip_p, generator)
        if flipped:
            crop = F.horizontal_flip(crop)
        box = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width])
        return crop, box, flipped

    def colour(self, crop: Tensor, spec: CropSpec, generator: torch.Generator | None = None) -> Tensor:
        """The photometric part of one view on a uint8 crop; float in between, one rounding at the end."""
        do_jitter = _bernoulli(self.jitter_p, generator)
        do_gray = _bernoulli(self.grayscale_p, generator)
        do_blur = _bernoulli(spec.blur_p, generator)
        do_solarize = _bernoulli(spec.solarize_p, generator)
        # drawn whether used or not, so that one view's choices never shift the next view's draws
        jitter_params = color_jitter_params(self.jitter, generator)
        sigma = _uniform(*self.blur_sigma, generator)
        if not (do_jitter or do_gray or do_blur or do_solarize):
            return crop
        x = crop.float().div_(255.0)
        if do_jitter:
            x = colour.color_jitter(x, jitter_params)
        if do_gray:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if do_blur:
            x = colour.gaussian_blur(x, sigma)
        if do_solarize:
            x = colour.solarize(x, self.solarize_threshold / 255.0)
        return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)  # not in place: grayscale's output is expanded

    def __repr__(self) -> str:
        groups = f"{self.n_global} x {self.global_size} {self.global_scale}"
        if self.n_local:
            groups += f" + {self.n_local} x {self.local_size} {self.local_scale}"
        return f"{type(self).__name__}({groups}, {self.interpolation})"


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of the views of data-set item ``index`` in ``epoch`` of a run seeded with ``seed``.

    A pure function of the three numbers (mixed by SplitMix64-style hashing so that neighbouring items
    and epochs get unrelated streams): the views do not depend on the loader worker, its order or the
    number of processes.
    """
    state = 0
    for value in (seed, epoch, index):
        state = _splitmix64((state ^ (int(value) & _MASK64)) & _MASK64)
    return torch.Generator().manual_seed(state & ((1 << 63) - 1))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def collate_views(batch: Sequence[tuple[ViewSample, int, int]], normalize: bool = False) -> Views:
    """Stack ``(ViewSample, label, index)`` items into a ``Views`` batch.

    With ``normalize`` the crops are turned into normalised floats here (in the loader worker) instead of on
    the device; uint8 crops are 4x smaller to send between processes and to the device.
    """
    samples, labels, indices = zip(*batch)
    num_views = len(samples[0].crops)
    if any(len(sample.crops) != num_views for sample in samples):
        raise ValueError("every sample of a batch needs the same number of views")
    prepare = normalize_uint8 if normalize else (lambda crop: crop)
    # default_collate stacks into shared memory inside a worker, sparing a copy on the way to the main process.
    crops = [default_collate([prepare(sample.crops[v]) for sample in samples]) for v in range(num_views)]
    return Views(
        crops=crops,
        boxes=default_collate([sample.boxes for sample in samples]),
        flipped=default_collate([sample.flipped for sample in samples]),
        image_size=default_collate([sample.image_size for sample in samples]),
        label=torch.tensor(labels, dtype=torch.long),
        index=torch.tensor(indices, dtype=torch.long),
    )

