"""Reference points for the probes: features that involve no learning at all.

``RawPixels`` is an ``SSLModule`` whose "backbone" returns the pixels themselves, so every probe can be run
on it with the same data, protocol and code as on a pretrained model:

    python -m ssl_modules validate --config examples/configs/quickstart.yaml \\
        --model ssl_modules.methods.baselines.RawPixels

A pretrained backbone that does not beat raw pixels (and its own random initialisation, which is what
``validate`` without a checkpoint measures) has learned nothing the probes can see.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.networks.backbones import Features
from ssl_modules.methods.base import SSLModule

__all__ = ["PixelFeatures", "RawPixels"]


class PixelFeatures(nn.Module):
    """Pixels as features: each ``patch x patch`` cell's pixel values form its dense vector, and the image
    average-pooled to a ``pooled x pooled`` thumbnail is the global vector.

    It has no trainable parameter; the attributes mirror :class:`~ssl_modules.networks.backbones.Backbone` so that
    ``SSLModule`` can hold it.
    """

    is_vit = False
    has_batchnorm = False

    def __init__(self, patch_size: int = 8, pooled_size: int = 8) -> None:
        super().__init__()
        if patch_size < 1 or pooled_size < 1:
            raise ValueError(f"patch_size ({patch_size}) and pooled_size ({pooled_size}) must be >= 1")
        self.name = "pixels"
        self.stride = patch_size
        self.pooled_size = pooled_size
        self.num_features = 3 * pooled_size * pooled_size
        self.model_kwargs: dict[str, Any] = {}

    def forward(self, images: Tensor) -> Features:
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(f"images of {height}x{width} px do not split into {self.stride}-px patches; "
                             f"use sizes that are multiples of {self.stride}")
        dense = F.unfold(images, self.stride, stride=self.stride).transpose(1, 2)
        pooled = F.adaptive_avg_pool2d(images, self.pooled_size).flatten(1)
        return Features(pooled, dense, (height // self.stride, width // self.stride))


class RawPixels(SSLModule):
    """The raw-pixel baseline of the probes: nothing to train, ``embed`` returns the pixels.

    Args:
        patch_size: side of the pixel cells that make the dense features (match the compared backbone's
            patch size or stride, so that both give the same grid).
        pooled_size: side of the thumbnail that makes the global vector (``3 * pooled_size**2`` values).
    """

    def __init__(self, patch_size: int = 8, pooled_size: int = 8) -> None:
        self._pixel_args = (patch_size, pooled_size)
        super().__init__(backbone="pixels", lr=1.0, warmup_epochs=0.0, weight_decay=0.0)
        # An optimizer needs a parameter; this one never receives a gradient.
        self.unused = nn.Parameter(torch.zeros(()), requires_grad=False)

    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> PixelFeatures:
        return PixelFeatures(*self._pixel_args)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        raise RuntimeError("RawPixels is a baseline for the probes: evaluate it with `validate`, not `fit`")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.unused], lr=0.0)

    def export_backbone(self, path):  # type: ignore[override]
        raise RuntimeError("RawPixels has no weights to export")
