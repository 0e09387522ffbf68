"""Image transforms of the evaluation protocols, as the reference code applies them.

Every random transform draws from a generator seeded by ``(seed, pass, dataset index)``, so an image gets
the same augmentation whatever the number of processes or loader workers. The geometry shared with the
probes and the training views comes from ``datamodules``: DINO's resize and centre crop
(``resize_centre_crop``) and RandomResizedCrop's box (``random_resized_crop_params``, here with float64
uniform draws). Normalisation is torchvision's ``normalize`` of ``[0, 1]`` floats, as the reference code.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from datamodules.transforms import resize_centre_crop
from datamodules.views import random_resized_crop_params
from ssl_modules.contracts import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OPEN_HB_STD", "normalise", "resize_centre_crop", "squash",
           "sample_generator", "uniform_draw", "random_resized_crop_params", "hummingbird_memory_augment",
           "keep_ratio_resize"]

# open-hummingbird-eval's transforms use 0.255 for the blue channel (hbird/utils/transforms.py), a typo kept
# only by ``std="open-hb"``.
OPEN_HB_STD = (0.229, 0.224, 0.255)


def normalise(image: Tensor, std: tuple[float, float, float] = IMAGENET_STD) -> Tensor:
    """uint8 ``(3, H, W)`` -> float normalised with the ImageNet mean and ``std``."""
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, std)


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


def uniform_draw(low: float, high: float, generator: torch.Generator | None) -> float:
    """One uniform draw in ``[low, high)``, the float32 sample scaled in float64 (the protocols' draws)."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def hummingbird_memory_augment(image: Tensor, mask: Tensor, size: int, generator: torch.Generator,
                               scale: tuple[float, float] = (0.5, 2.0), jitter: float = 0.1,
                               jitter_p: float = 0.5) -> tuple[Tensor, Tensor]:
    """open-hummingbird-eval's memory augmentation: a shared ``RandomResizedCrop(size, scale=(0.5, 2.0))`` of
    image and mask (areas above the image fall back to the whole image), then brightness, contrast,
    saturation and hue jitter of 0.1, each applied with probability 0.5, on the image only; no flip."""
    top, left, h, w = random_resized_crop_params(*image.shape[-2:], scale, (3 / 4, 4 / 3), generator, uniform_draw)
    image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    mask = TF.resized_crop(mask[None], top, left, h, w, [size, size],
                           interpolation=TF.InterpolationMode.NEAREST)[0]
    adjustments = ((TF.adjust_brightness, 1 - jitter, 1 + jitter), (TF.adjust_contrast, 1 - jitter, 1 + jitter),
                   (TF.adjust_saturation, 1 - jitter, 1 + jitter), (TF.adjust_hue, -jitter, jitter))
    for adjust, low, high in adjustments:
        if float(torch.rand((), generator=generator)) < jitter_p:
            image = adjust(image, uniform_draw(low, high, generator))
    return image, mask
