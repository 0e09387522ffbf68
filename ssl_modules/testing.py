"""Helpers for tests and benchmarks: random ``Views`` batches with consistent crop geometry."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssl_modules.contracts import Views

__all__ = ["random_views"]


def _random_boxes(batch_size: int, num_views: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Normalised ``(y0, x0, y1, x1)`` boxes whose sides are ``sqrt`` of a uniform area fraction."""
    side = torch.empty(batch_size, num_views, 2).uniform_(*scale, generator=generator).sqrt()
    start = torch.rand(batch_size, num_views, 2, generator=generator) * (1 - side)
    return torch.cat([start, start + side], dim=-1)


def random_views(
    batch_size: int,
    sizes: Sequence[int],
    image_size: tuple[int, int] = (480, 640),
    scale: tuple[float, float] = (0.25, 1.0),
    labels: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Views:
    """A ``Views`` batch of random pixels with plausible geometry.

    Args:
        batch_size: images per batch.
        sizes: the square size of every view, global views first (e.g. ``[224, 224, 96, 96]``).
        image_size: ``(H, W)`` of every seed image in pixels.
        scale: range of the crops' area fraction.
        labels: number of classes for random labels; ``None`` gives -1 (unlabelled).
        seed: seed of the generator.
    """
    gen = torch.Generator().manual_seed(seed)
    crops = [torch.randn(batch_size, 3, s, s, generator=gen, dtype=dtype).to(device) for s in sizes]
    boxes = _random_boxes(batch_size, len(sizes), scale, gen).to(device)
    flipped = (torch.rand(batch_size, len(sizes), generator=gen) < 0.5).to(device)
    size = torch.tensor(image_size, dtype=torch.float32).expand(batch_size, 2).clone().to(device)
    if labels is None:
        label = torch.full((batch_size,), -1, dtype=torch.long)
    else:
        label = torch.randint(0, labels, (batch_size,), generator=gen)
    index = torch.arange(batch_size)
    return Views(crops, boxes, flipped, size, label.to(device), index.to(device))
