"""Reading images and masks from files, and finding image files in folders.

Images are decoded with PIL (Pillow; its libjpeg-turbo for JPEG), not with ``torchvision.io`` (deprecated
since torchvision 0.29), and give what ``torchvision.io.decode_image(..., ImageReadMode.RGB)`` gave before,
pixel for pixel and in the same memory layout: JPEG, PNG, GIF and WebP come as a ``(3, H, W)`` view of
``(H, W, 3)`` memory, 16-bit PNGs keep their high byte, CMYK JPEGs use torchvision's ``C * K / 255``
conversion; no EXIF orientation is applied. Other formats (BMP, TIFF, PPM, ...) come contiguous, 16-bit
grayscale scaled and rounded. Whatever the file holds — grayscale, RGBA, CMYK, palette, 16-bit — the result
is RGB uint8.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "read_image", "read_mask", "list_images", "CorruptImageWarning", "MaskFormatError"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


class MaskFormatError(ValueError):
    """A segmentation mask is readable but not a mask of class indices (e.g. stored as RGB colours)."""


def read_image(path: str | os.PathLike) -> Tensor:
    """The image at ``path`` as an RGB uint8 tensor ``(3, H, W)``.

    Raises ``OSError``/``ValueError``/``SyntaxError`` (PIL's errors) when the file is missing, truncated or
    not an image.
    """
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"{path} is empty")
    with _open(data, path) as image:
        image.load()
        return _as_torchvision_gave(image) if _torchvision_format(data) else _as_pil_gave(image)


def _torchvision_format(data: bytes) -> bool:
    """JPEG, PNG, GIF or WebP by magic number: the formats torchvision decoded before."""
    return (data.startswith((_JPEG_MAGIC, _PNG_MAGIC, b"GIF8"))
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def _open(data: bytes, path: str | os.PathLike) -> Image.Image:
    """A lazily decoded PIL image of ``data``, the contents of ``path``.

    JPEG and PNG open with their plugins directly, as torchvision read them: without PIL's decompression-bomb
    check (a warning above ~89 megapixels, an error above ~179); other formats go through ``Image.open``.
    """
    if data.startswith(_JPEG_MAGIC):
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    if data.startswith(_PNG_MAGIC):
        return PngImagePlugin.PngImageFile(io.BytesIO(data))
    return Image.open(path)  # errors name the file


def _as_torchvision_gave(image: Image.Image) -> Tensor:
    """A decoded JPEG/PNG/GIF/WebP as ``torchvision.io.decode_image(..., ImageReadMode.RGB)`` gave it."""
    if image.mode.startswith("I"):  # 16-bit grayscale PNG: uint16 then to_dtype(uint8, scale=True), a shift
        high = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return _hwc_view(np.repeat(high[..., None], 3, axis=2))
    if image.mode == "CMYK":  # stored Adobe-inverted; PIL undoes the inversion, torchvision did not
        stored = 255 - np.asarray(image).astype(np.uint16)
        return _hwc_view((stored[..., :3] * stored[..., 3:] // 255).astype(np.uint8))
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # alpha dropped, palette looked up, gray x 3
    width, height = rgb.size
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)  # writable, one copy
    return pixels.view(height, width, 3).permute(2, 0, 1)


def _hwc_view(array: np.ndarray) -> Tensor:
    """A writable ``(H, W, 3)`` uint8 array as a ``(3, H, W)`` tensor on the same memory."""
    return torch.from_numpy(array).permute(2, 0, 1)


def _as_pil_gave(image: Image.Image) -> Tensor:
    """Any other format, contiguous ``(3, H, W)``: 16/32-bit integer or float gray scaled (16-bit ranges)
    and rounded to 8 bits, every other mode (L, LA, RGBA, P, CMYK, YCbCr, ...) converted by PIL."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        gray = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
        return torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous()
    rgb = image.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_mask(path: str | os.PathLike) -> Tensor:
    """A class-index mask ``(H, W)`` uint8: palette PNGs give their palette indices (not their colours).

    Raises ``MaskFormatError`` for masks stored as colours (RGB/RGBA), whose classes cannot be read back.
    """
    with Image.open(path) as mask:
        mask.load()
        if mask.mode not in ("P", "L"):
            raise MaskFormatError(
                f"{path} is a {mask.mode} image; segmentation masks must be palette ('P') or grayscale ('L') "
                "PNGs whose pixel values are class indices (VOC's SegmentationClass format)"
            )
        return torch.from_numpy(np.asarray(mask).copy())


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by extension, case-insensitive), sorted; hidden entries are skipped."""
    return sorted(_walk(Path(folder), recursive))


def _walk(folder: Path, recursive: bool) -> Iterable[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if recursive:
                    yield from _walk(Path(entry.path), recursive)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(entry.path)
