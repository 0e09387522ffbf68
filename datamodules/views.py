"""Multi-crop views with the geometry of every crop (the training batch of every pretraining DataModule)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Views"]


class Views(NamedTuple):
    """A batch of multi-crop views, the training batch contract of ``shared/DESIGN.md``.

    Attributes:
        crops: V tensors ``(B, 3, H_v, W_v)``, the global (large) crops first, then the local ones.
            Float and normalised when they reach the LightningModule.
        boxes: ``(B, V, 4)`` float, each crop's box in the seed image, normalised ``(y0, x0, y1, x1)``.
        flipped: ``(B, V)`` bool, horizontal flip applied to the crop (after cropping).
        image_size: ``(B, 2)`` float, the seed image's ``(height, width)`` in pixels.
        label: ``(B,)`` long class index, -1 where the data set has none.
        index: ``(B,)`` long index of the image in its data set.
    """

    crops: list[Tensor]
    boxes: Tensor
    flipped: Tensor
    image_size: Tensor
    label: Tensor
    index: Tensor

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_views(self) -> int:
        return len(self.crops)

    def pixel_boxes(self) -> Tensor:
        """Boxes in seed-image pixels, ``(B, V, 4)``: ``boxes * (H, W, H, W)``."""
        return self.boxes * self.image_size.repeat(1, 2)[:, None, :]
