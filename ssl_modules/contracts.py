"""The two contracts every part of the library speaks: the training batch (``Views``) and the backbone
features (``Features``), with the image normalisation they assume (``docs/architecture.md``).

This module imports nothing but torch, so the data package, the methods, the callbacks and user code can all
import it without cycles (``datamodules`` re-exports ``Views``; ``ssl_modules`` exports both).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Views", "Features", "IMAGENET_MEAN", "IMAGENET_STD", "normalize_uint8"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
# 0.229 for red: VICRegL's pretraining code has 0.228 (a typo, docs/vicregl.md); every other recipe uses 0.229.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: What selects images of a batch: an int, a slice, a sequence of ints or an index/bool tensor.
ImageIndex = int | slice | Sequence[int] | Tensor


def normalize_uint8(
    images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> Tensor:
    """uint8 images ``(..., 3, H, W)`` in [0, 255] -> float32 ``(x / 255 - mean) / std``, in one pass each way.

    Float inputs are taken as already normalised and returned unchanged.
    """
    if images.is_floating_point():
        return images
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(-1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(-1, 1, 1) * 255.0
    return images.float().sub_(mean_t).div_(std_t)


def _as_batch_index(index: ImageIndex, batch_size: int) -> slice | Tensor:
    """An image selection that keeps the batch dimension (an int ``i`` becomes ``i:i+1``)."""
    if isinstance(index, bool):
        raise TypeError("Views.select(index): index must select images (int, slice, ints or a tensor), not a bool")
    if isinstance(index, int):
        if not -batch_size <= index < batch_size:
            raise IndexError(f"Views.select({index}): the batch has {batch_size} images")
        index %= batch_size
        return slice(index, index + 1)
    if isinstance(index, slice):
        return index
    return torch.as_tensor(index, dtype=None if isinstance(index, Tensor) else torch.long)


class Views(NamedTuple):
    """A batch of multi-crop views, the training batch of every pretraining DataModule.

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

    def normalized(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Views:
        """The same batch with uint8 crops turned into float32 ``(x / 255 - mean) / std``; float crops are kept."""
        return self._replace(crops=[normalize_uint8(crop, mean, std) for crop in self.crops])

    def select(self, index: ImageIndex = slice(None), views: slice | Sequence[int] | None = None) -> Views:
        """A sub-batch: the images ``index`` selects (the batch dimension is kept, an int gives one image)
        and, optionally, only the crops ``views`` selects, with every per-crop field cut alike.

        ``views.select(slice(0, 4), views=slice(0, 2))`` is the first 4 images' two global crops.
        """
        rows = _as_batch_index(index, self.batch_size)
        columns = list(range(self.num_views))[views] if isinstance(views, slice) else (
            list(range(self.num_views)) if views is None else [int(v) for v in views])
        if not columns or any(not 0 <= v < self.num_views for v in columns):
            raise IndexError(f"Views.select(views={views!r}): the batch has {self.num_views} crops; select at least "
                             "one of them")
        return Views(
            crops=[self.crops[v][rows] for v in columns],
            boxes=self.boxes[rows][:, columns],
            flipped=self.flipped[rows][:, columns],
            image_size=self.image_size[rows],
            label=self.label[rows],
            index=self.index[rows],
        )


class Features(NamedTuple):
    """What every backbone gives.

    Attributes:
        global_: ``(B, C)`` the pooled vector (CLS token for ViTs, average-pooled last map for CNNs).
        dense: ``(B, N, C)`` patch tokens / last feature-map cells, row-major, ``N = h * w``.
        grid: ``(h, w)`` of the dense features.
    """

    global_: Tensor
    dense: Tensor
    grid: tuple[int, int]
