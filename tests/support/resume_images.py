"""Tiny PNG files for the resume tests."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import write_png


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 48)) -> list[Path]:
    """``count`` random RGB PNGs of ``size`` in ``folder``."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        write_png(torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator), str(path))
        paths.append(path)
    return paths
