"""Deterministic transforms of the probes and the evaluation protocols: resize the shorter side, centre crop,
normalise."""
from __future__ import annotations

import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode

from ssl_modules.contracts import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8  # torch only

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "EvalTransform",
    "ResizeTransform",
    "SegmentationEvalTransform",
    "normalize_uint8",
    "resize_centre_crop",
]

INTERPOLATIONS: dict[str, InterpolationMode] = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode of an interpolation name, with an error listing the valid names."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation={name!r} is unknown; use one of {sorted(INTERPOLATIONS)}") from None


def _check_size(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be a positive number of pixels")


def resize_centre_crop(image: Tensor, size: int, resize_size: int | None = None,
                       interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> Tensor:
    """The evaluation crop of DINO and of the probes: the shorter side resized (antialiased) to ``resize_size``
    (default ``round(size * 256 / 224)``), then the centre ``size x size``; the image keeps its dtype."""
    resize_size = resize_size if resize_size is not None else round(size * 256 / 224)
    image = F.resize(image, [resize_size], interpolation=interpolation, antialias=True)
    return F.center_crop(image, [size, size])


class EvalTransform:
    """Classification probe transform: resize the shorter side to ``resize_size``, centre crop ``size``, normalise.

    Args:
        size: side of the square output.
        resize_size: shorter side after resizing; default ``round(size * 256 / 224)`` (the ImageNet habit).
        interpolation: ``"bicubic"`` (default), ``"bilinear"`` or ``"nearest"``.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Call it on a uint8 ``(3, H, W)`` image; it returns float32 ``(3, size, size)``.
    """

    def __init__(
        self,
        size: int = 224,
        resize_size: int | None = None,
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        _check_size("size", size)
        self.size = size
        self.resize_size = resize_size if resize_size is not None else round(size * 256 / 224)
        _check_size("resize_size", self.resize_size)
        self.interpolation = interpolation_mode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor) -> Tensor:
        image = resize_centre_crop(image, self.size, self.resize_size, self.interpolation)
        return normalize_uint8(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_size={self.resize_size})"


class ResizeTransform:
    """Resize the whole image to ``size`` (aspect ratio not kept: nothing is cut away), then normalise.

    What ContrastiveCrop's box update looks at (``docs/bam.md``): every training image squashed to the
    model's input size.

    Args:
        size: output side, or ``(height, width)``.
        interpolation: ``"bilinear"`` (default, as the official box update), ``"bicubic"`` or ``"nearest"``.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Call it on a uint8 ``(3, H, W)`` image; it returns float32 ``(3, height, width)``.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        interpolation: str = "bilinear",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        _check_size("height", height)
        _check_size("width", width)
        self.size = (height, width)
        self.interpolation = interpolation_mode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor) -> Tensor:
        image = F.resize(image, list(self.size), interpolation=self.interpolation, antialias=True)
        return normalize_uint8(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class SegmentationEvalTransform:
    """Image and mask together: resize the shorter side to ``size``, centre crop ``size x size``.

    The image is resized with ``interpolation`` (antialiased) and normalised; the mask with nearest
    neighbours, so it keeps its class indices (and 255 = ignore).

    Args:
        size: side of the square output.
        interpolation: of the image; the mask is always nearest.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
    """

    def __init__(
        self,
        size: int = 224,
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        _check_size("size", size)
        self.size = size
        self.interpolation = interpolation_mode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 image ``(3, H, W)`` and integer mask ``(H, W)`` -> float image ``(3, S, S)``, long mask ``(S, S)``."""
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ in size")
        image = F.resize(image, [self.size], interpolation=self.interpolation, antialias=True)
        mask = F.resize(mask[None], [self.size], interpolation=InterpolationMode.NEAREST_EXACT)
        image = F.center_crop(image, [self.size, self.size])
        mask = F.center_crop(mask, [self.size, self.size])[0]
        return normalize_uint8(image, self.mean, self.std), mask.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
