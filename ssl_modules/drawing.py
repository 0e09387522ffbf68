"""Drawing helpers for diagnostics: images in, float ``(3, H, W)`` pictures in [0, 1] out.

Pictures are drawn at a readable size (crops nearest-upsampled to ``PANEL`` pixels) with their labels and a
caption in the image, so a picture read in TensorBoard says what it shows. Text and lines use Pillow.
"""
from __future__ import annotations

from collections.abc import Sequence

import colorsys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from ssl_modules.contracts import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "label_palette",
    "colorize_labels",
    "tile",
    "segmentation_comparison",
    "PANEL",
    "cluster_palette",
    "label_boundaries",
    "crop_and_clusters",
    "cluster_rows",
    "match_panels",
    "attention_picture",
    "with_caption",
]

PANEL = 96  # pixels of one crop panel: 32 px crops are drawn 3x
BOUNDARY = (1.0, 1.0, 1.0)


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


# ------------------------------------------------------------------------------------ readable pictures

def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _to_pil(picture: Tensor) -> Image.Image:
    array = (picture.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def _from_pil(image: Image.Image) -> Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(
        image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def _upscale(picture: Tensor, size: int) -> Tensor:
    """Nearest-neighbour resize of ``(C, H, W)`` so that its height is ``size`` (pixels stay visible)."""
    width = max(1, round(picture.shape[-1] * size / picture.shape[-2]))
    return F.interpolate(picture[None].float(), size=(size, width), mode="nearest")[0]


def cluster_palette(num_labels: int) -> Tensor:
    """``(num_labels, 3)`` colours that are easy to tell apart: hues spread by the golden angle, alternating
    brightness, fully saturated (unlike the dark VOC colours, they do not blend into a scene's own colours)."""
    colours = [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85 if k % 2 else 1.0, 1.0 if k % 3 else 0.75)
               for k in range(num_labels)]
    return torch.tensor(colours, dtype=torch.float32).reshape(num_labels, 3)


def label_boundaries(labels: Tensor) -> Tensor:
    """``(H, W)`` bool: pixels whose right or lower neighbour has another label."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def crop_and_clusters(crop: Tensor, labels: Tensor, num_labels: int, size: int = PANEL) -> Tensor:
    """``crop | clusters`` as ``(3, size, 2 * size)``: the crop (in [0, 1]) with the cluster boundaries drawn
    in white, beside the clusters in :func:`cluster_palette` colours with the same boundaries."""
    picture = _upscale(crop.cpu().float(), size)[:, :, :size]
    up = _resize_labels(labels.cpu(), picture.shape[-2:])
    edge = label_boundaries(up)
    boundary = torch.tensor(BOUNDARY)[:, None]
    clusters = cluster_palette(num_labels)[up.clamp(0, num_labels - 1)].permute(2, 0, 1).contiguous()
    for panel in (picture, clusters):
        panel[:, edge] = boundary
    return torch.cat([picture, clusters], dim=-1)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line] if line else lines


def _text_band(width: int, lines: Sequence[str], size: int = 12) -> Tensor:
    """A white band of ``width`` pixels with ``lines`` of black text, each wrapped to the width."""
    font = _font(size)
    lines = [wrapped for line in lines for wrapped in _wrap(line, font, width - 8)]
    band = Image.new("RGB", (width, (size + 4) * len(lines) + 4), "white")
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((4, 2 + k * (size + 4)), line, fill="black", font=font)
    return _from_pil(band)


def with_caption(picture: Tensor, lines: Sequence[str]) -> Tensor:
    """``picture`` under a caption band (one line of text per entry of ``lines``)."""
    return torch.cat([_text_band(picture.shape[-1], lines), picture.cpu()], dim=-2)


def cluster_rows(crops: Sequence[Tensor], labels: Tensor, num_labels: int, caption: Sequence[str],
                 size: int = PANEL) -> Tensor:
    """One row per image: ``view 1 | its clusters | view 2 | its clusters`` (crops ``(B, 3, h, w)`` in [0, 1]
    per view, ``labels`` ``(V, B, h', w')``), column titles on top and ``caption`` above them."""
    rows = []
    for i in range(labels.shape[1]):
        pairs = [crop_and_clusters(crops[v][i], labels[v, i], num_labels, size) for v in range(len(crops))]
        rows.append(torch.cat([torch.cat([pair, torch.ones(3, size, 4)], dim=-1) for pair in pairs], dim=-1))
    grid = torch.cat([torch.cat([row, torch.ones(3, 4, row.shape[-1])], dim=-2) for row in rows], dim=-2)
    titles = Image.new("RGB", (grid.shape[-1], 18), "white")
    draw = ImageDraw.Draw(titles)
    for v in range(len(crops)):
        x = v * (2 * size + 4)
        draw.text((x + 4, 2), f"view {v + 1}: crop", fill="black", font=_font())
        draw.text((x + size + 4, 2), f"view {v + 1}: clusters", fill="black", font=_font())
    return with_caption(torch.cat([_from_pil(titles), grid], dim=-2), caption)


def _cell_box(index: int, grid: Sequence[int], size: int) -> tuple[float, float, float, float]:
    rows, cols = grid
    r, c = divmod(int(index), cols)
    return c * size / cols, r * size / rows, (c + 1) * size / cols, (r + 1) * size / rows


def _cell_centre_xy(index: int, grid: Sequence[int], size: int) -> tuple[float, float]:
    x0, y0, x1, y1 = _cell_box(index, grid, size)
    return (x0 + x1) / 2, (y0 + y1) / 2


def match_panels(crop_a: Tensor, crop_b: Tensor, grid_a: Sequence[int], grid_b: Sequence[int],
                 matches: Sequence[tuple[str, Tensor, Tensor, Tensor | None]], size: int = 2 * PANEL,
                 gap: int = 24) -> Tensor:
    """One row per matching: ``crop a | crop b`` (in [0, 1]) with their feature cells outlined and a line per
    match between the matched cells' centres (dots at both ends).

    ``matches`` holds ``(title, index_a, index_b, good)``: cell indices (row-major) of each pair, and
    optionally a bool per pair: green lines for True (agrees with the geometry), red for False; yellow
    without it.
    """
    rows = []
    for title, index_a, index_b, good in matches:
        canvas = Image.new("RGB", (2 * size + gap, size + 18), "white")
        canvas.paste(_to_pil(_upscale(crop_a.cpu(), size)[:, :, :size]), (0, 18))
        canvas.paste(_to_pil(_upscale(crop_b.cpu(), size)[:, :, :size]), (size + gap, 18))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 2), title, fill="black", font=_font())
        for offset, grid in ((0, grid_a), (size + gap, grid_b)):
            for cell in range(grid[0] * grid[1]):
                x0, y0, x1, y1 = _cell_box(cell, grid, size)
                draw.rectangle((offset + x0, 18 + y0, offset + x1 - 1, 18 + y1 - 1), outline=(90, 90, 90))
        for k in range(len(index_a)):
            colour = (255, 220, 0) if good is None else ((0, 200, 0) if bool(good[k]) else (230, 0, 0))
            xa, ya = _cell_centre_xy(index_a[k], grid_a, size)
            xb, yb = _cell_centre_xy(index_b[k], grid_b, size)
            start, end = (xa, 18 + ya), (size + gap + xb, 18 + yb)
            draw.line((start, end), fill=colour, width=2)
            for x, y in (start, end):
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour, outline="black")
        rows.append(_from_pil(canvas))
    return torch.cat(rows, dim=-2)


def _value_colours(m: Tensor) -> Tensor:
    """``(R, C)`` values in [0, 1] -> ``(3, R, C)``: dark blue (0) through teal to yellow (1)."""
    return torch.stack([m, 0.15 + 0.75 * m.sqrt(), 0.45 * (1 - m) + 0.1]).clamp(0, 1)


def attention_picture(matrix: Tensor, positives: Tensor, batch_size: int, title: str,
                      row_name: str = "crop", column_name: str = "target crop", cell: int | None = None) -> Tensor:
    """A BAM-style matrix ``(V * B, T * B)`` (rows crop-major: row ``v * B + i``; columns ``t * B + j``) as a
    labelled heat map: every entry a ``cell``-pixel square coloured by its value (scaled by the matrix
    maximum, given in the caption), white lines between the crop blocks, the ``positives`` (same image,
    removed from the attention) marked by a grey square with a dot, block labels on both axes."""
    m = matrix.detach().float().cpu()
    rows, columns = m.shape
    cell = cell or max(4, min(16, 384 // max(rows, columns)))
    scale = float(m.max().clamp(min=1e-12))
    colours = _value_colours(m / scale)
    colours[:, positives.cpu()] = 0.55
    image = _to_pil(colours.repeat_interleave(cell, 1).repeat_interleave(cell, 2))
    left, top = 64, 34
    canvas = Image.new("RGB", (left + image.width + 4, top + image.height + 4), "white")
    canvas.paste(image, (left, top))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    for r, c in positives.nonzero().tolist():
        x, y = left + c * cell + cell // 2, top + r * cell + cell // 2
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill="black")
    for v in range(1, rows // batch_size):
        draw.line((left, top + v * batch_size * cell, left + image.width, top + v * batch_size * cell), fill="white",
                  width=2)
    for t in range(1, columns // batch_size):
        draw.line((left + t * batch_size * cell, top, left + t * batch_size * cell, top + image.height), fill="white",
                  width=2)
    for v in range(rows // batch_size):
        draw.text((2, top + v * batch_size * cell + 1), f"{row_name} {v + 1}", fill="black", font=font)
        draw.text((2, top + v * batch_size * cell + 13), f"img 1-{batch_size}", fill="black", font=font)
    for t in range(columns // batch_size):
        draw.text((left + t * batch_size * cell + 2, top - 14), f"{column_name} {t + 1}", fill="black", font=font)
    draw.text((left, 2), f"rows: {row_name}s, cols: {column_name}s", fill="black", font=font)
    picture = _from_pil(canvas)
    return with_caption(picture, [title, f"block '{row_name} v' = crop v of images 1-{batch_size}, in order; "
                                         f"colour: 0 (blue) .. {scale:.3g} (yellow); grey with dot: same image "
                                         "(positives, removed)"])
