"""Image transforms of the evaluation protocols, as the reference code applies them.

Every random transform draws from a generator seeded by ``(seed, pass, dataset index)``, so an image gets
the same augmentation whatever the number of processes or loader workers.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OPEN_HB_STD", "normalise", "resize_centre_crop", "squash",
           "sample_generator", "random_resized_box", "hummingbird_memory_augment", "keep_ratio_resize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open-hummingbird-eval's transforms use 0.255 for the blue channel (hbird/utils/transforms.py), a typo kept
# only by ``std="open-hb"``.
OPEN_HB_STD = (0.229, 0.224, 0.255)


def normalise(image: Tensor, std: tuple[float, float, float] = IMAGENET_STD) -> Tensor:
    """uint8 ``(3, H, W)`` -> float normalised with the ImageNet mean and ``std``."""
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, std)


def resize_centre_crop(image: Tensor, size: int) -> Tensor:
    """DINO's evaluation transform: shorter side to ``size * 256 / 224`` (bicubic), centre crop ``size``."""
    resized = TF.resize(image, [int(round(size * 256 / 224))], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True)
    return TF.center_crop(resized, [size, size])


def squash(image: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """open-hummingbird-eval's resize: both sides to ``size`` (aspect ratio not kept), masks nearest."""
    image = TF.resize(image, [size, size], antialias=True)
    mask = TF.resize(mask[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)[0]
    return image, mask


def keep_ratio_resize(image: Tensor, short_side: int) -> Tensor:
    """Shorter side to ``short_side`` (bilinear), aspect ratio kept (mmseg's test-time ``Resize``)."""
    return TF.resize(image, [short_side], antialias=True)


def sample_generator(seed: int, pass_number: int, index: int) -> torch.Generator:
    """The generator of one image's augmentation in one pass."""
    return torch.Generator().manual_seed((seed * 1_000_003 + pass_number) * 1_000_003 + index)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop``: 10 tries of a random area fraction and
    log-uniform aspect ratio, then the centre crop of the whole image with the ratio clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def hummingbird_memory_augment(image: Tensor, mask: Tensor, size: int, generator: torch.Generator,
                               scale: tuple[float, float] = (0.5, 2.0), jitter: float = 0.1,
                               jitter_p: float = 0.5) -> tuple[Tensor, Tensor]:
    """open-hummingbird-eval's memory augmentation: a shared ``RandomResizedCrop(size, scale=(0.5, 2.0))`` of
    image and mask (areas above the image fall back to the whole image), then brightness, contrast,
    saturation and hue jitter of 0.1, each applied with probability 0.5, on the image only; no flip."""
    top, left, h, w = random_resized_box(*image.shape[-2:], scale, (3 / 4, 4 / 3), generator)
    image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    mask = TF.resized_crop(mask[None], top, left, h, w, [size, size],
                           interpolation=TF.InterpolationMode.NEAREST)[0]
    adjustments = ((TF.adjust_brightness, 1 - jitter, 1 + jitter), (TF.adjust_contrast, 1 - jitter, 1 + jitter),
                   (TF.adjust_saturation, 1 - jitter, 1 + jitter), (TF.adjust_hue, -jitter, jitter))
    for adjust, low, high in adjustments:
        if float(torch.rand((), generator=generator)) < jitter_p:
            image = adjust(image, _uniform(generator, low, high))
    return image, mask
