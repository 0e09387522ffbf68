"""Drawing helpers for diagnostics: images in, float ``(3, H, W)`` pictures in [0, 1] out (torch only)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "label_palette",
    "colorize_labels",
    "overlay_labels",
    "heatmap",
    "draw_matches",
    "tile",
    "segmentation_comparison",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo the ImageNet normalisation of ``(..., 3, H, W)`` images and clamp to [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return (images.float() * std_t + mean_t).clamp(0, 1)


def label_palette(num_labels: int) -> Tensor:
    """A fixed palette ``(num_labels, 3)`` in [0, 1] (the Pascal VOC bit-interleaving colours)."""
    colours = torch.zeros(num_labels, 3)
    for label in range(num_labels):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[label] = torch.tensor([r, g, b]) / 255.0
    return colours


def colorize_labels(labels: Tensor, num_labels: int | None = None, ignore_index: int = 255) -> Tensor:
    """A label map ``(H, W)`` -> ``(3, H, W)`` colours; ``ignore_index`` is drawn white."""
    labels = labels.long().cpu()
    ignored = labels == ignore_index
    count = num_labels or int(labels[~ignored].max().item() + 1 if (~ignored).any() else 1)
    palette = label_palette(max(count, 1))
    image = palette[labels.clamp(0, count - 1)].permute(2, 0, 1)
    return torch.where(ignored[None], torch.ones_like(image), image)


def overlay_labels(image: Tensor, labels: Tensor, alpha: float = 0.5, num_labels: int | None = None) -> Tensor:
    """Blend a label map (any resolution, nearest-upsampled) over an image ``(3, H, W)`` in [0, 1]."""
    size = image.shape[-2:]
    up = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return (1 - alpha) * image.cpu() + alpha * colorize_labels(up, num_labels)


def heatmap(matrix: Tensor, size: int | None = None) -> Tensor:
    """A matrix ``(R, C)`` -> ``(3, R, C)`` picture (min-max scaled; dark blue to yellow), optionally resized."""
    m = matrix.detach().float().cpu()
    m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
    image = torch.stack([m, m.sqrt(), 1 - m]) * torch.tensor([1.0, 0.9, 0.6])[:, None, None]
    if size is not None:
        image = F.interpolate(image[None], size=(size, size * m.shape[1] // max(m.shape[0], 1) or 1),
                              mode="nearest")[0]
    return image.clamp(0, 1)


def _cell_centre(index: Tensor, grid: Sequence[int], height: int, width: int) -> tuple[Tensor, Tensor]:
    rows, cols = grid
    y = (torch.div(index, cols, rounding_mode="floor").float() + 0.5) * height / rows
    x = (index % cols).float().add(0.5) * width / cols
    return y, x


def _draw_line(canvas: Tensor, y0: float, x0: float, y1: float, x1: float, colour: Tensor) -> None:
    steps = int(max(abs(y1 - y0), abs(x1 - x0))) + 1
    ys = torch.linspace(y0, y1, steps).round().long().clamp(0, canvas.shape[1] - 1)
    xs = torch.linspace(x0, x1, steps).round().long().clamp(0, canvas.shape[2] - 1)
    canvas[:, ys, xs] = colour[:, None]


def draw_matches(
    crop_a: Tensor, crop_b: Tensor, grid_a: Sequence[int], grid_b: Sequence[int], index_a: Tensor, index_b: Tensor,
    normalized: bool = True,
) -> Tensor:
    """Two crops side by side with a line from cell ``index_a[k]`` of ``a`` to cell ``index_b[k]`` of ``b``."""
    a = denormalize(crop_a) if normalized else crop_a.float()
    b = denormalize(crop_b) if normalized else crop_b.float()
    height = max(a.shape[-2], b.shape[-2])
    canvas = torch.zeros(3, height, a.shape[-1] + b.shape[-1])
    canvas[:, : a.shape[-2], : a.shape[-1]] = a.cpu()
    canvas[:, : b.shape[-2], a.shape[-1] :] = b.cpu()
    ya, xa = _cell_centre(index_a.cpu(), grid_a, a.shape[-2], a.shape[-1])
    yb, xb = _cell_centre(index_b.cpu(), grid_b, b.shape[-2], b.shape[-1])
    palette = label_palette(len(ya) + 1)[1:]
    for k in range(len(ya)):
        _draw_line(canvas, ya[k].item(), xa[k].item(), yb[k].item(), xb[k].item() + a.shape[-1], palette[k])
    return canvas


def tile(images: Sequence[Tensor], nrow: int = 8, padding: int = 2) -> Tensor:
    """Tile ``(3, H, W)`` pictures of one size into one picture."""
    return make_grid(torch.stack([img.cpu().float() for img in images]), nrow=nrow, padding=padding, pad_value=1.0)


def _resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """A label map ``(h, w)`` resized to ``size`` by nearest neighbour (labels are never blended)."""
    return F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()


def segmentation_comparison(image: Tensor, target: Tensor, prediction: Tensor, num_labels: int,
                            normalized: bool = True, ignore_index: int = 255) -> Tensor:
    """One row ``image | ground truth | prediction`` (label maps coloured with the fixed palette, ignored
    pixels white, both resized to the image by nearest neighbour)."""
    picture = denormalize(image) if normalized else image.float().clamp(0, 1)
    size = picture.shape[-2:]
    maps = [colorize_labels(_resize_labels(m.cpu(), size), num_labels, ignore_index) for m in (target, prediction)]
    return tile([picture.cpu(), *maps], nrow=3)
