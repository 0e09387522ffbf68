"""Map-style data sets over image files, with one rule per kind of data for a file that cannot be read.

Pretraining images (``unreadable="skip"``, the default of ``ImageFiles`` and ``MultiCropImages``): a file that
cannot be decoded is skipped with a ``CorruptImageWarning`` naming it (once per file and process), the next
readable file takes its place, and ``skipped`` counts the skips across the loader's worker processes (the
counter lives in shared memory). An epoch never stops on a bad file.

Evaluation images (``unreadable="error"``: the probes' ``eval_dataset``, every ``SegmentationPairs``, the
data sets of ``evaluate``): an unreadable file raises ``UnreadableImageError`` naming it, since another image
in its place would be counted twice in a metric.

Only decoding is guarded: an error of a transform is a bug and propagates; a readable mask that is not a mask
of class indices raises a ``MaskFormatError`` either way.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .reading import CorruptImageWarning, MaskFormatError, read_image, read_mask
from .views import MultiCropViews, ViewSample, check_guide_boxes, item_generator

__all__ = ["ImageFiles", "MultiCropImages", "SegmentationPairs", "UnknownMaskValueError", "UnreadableImageError",
           "Unreadable"]

# Decoders raise all of these on truncated or foreign files.
_READ_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError)

#: What a data set does with a file it cannot decode: skip it (pretraining) or fail naming it (evaluation).
Unreadable = Literal["skip", "error"]


class UnknownMaskValueError(MaskFormatError):
    """A mask holds a value that is neither a class index nor the ignore index."""


class UnreadableImageError(ValueError):
    """An image or mask file of an evaluation data set cannot be decoded; the message names the file."""


def _read_named(read: Callable[[Path], Tensor], path: Path) -> Tensor:
    """``read(path)``, a decoding failure raised as ``UnreadableImageError`` naming ``path``."""
    try:
        return read(path)
    except MaskFormatError:  # readable but wrong data: a different error
        raise
    except _READ_ERRORS as error:
        raise UnreadableImageError(f"{path} cannot be read: {error}") from error


class _FileReader(Dataset):
    """Decodes item ``index`` with ``_decode``; an unreadable item is skipped or fails, as ``unreadable`` says."""

    max_consecutive_skips = 100

    def __init__(self, files: Sequence[Path], unreadable: Unreadable = "skip") -> None:
        if not files:
            raise ValueError("a data set needs at least one file")
        if unreadable not in ("skip", "error"):
            raise ValueError(f"unreadable={unreadable!r}; use 'skip' (pretraining) or 'error' (evaluation)")
        self.files = [Path(f) for f in files]
        self.unreadable = unreadable
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """How many reads failed so far, summed over all processes that read this data set."""
        return int(self._skipped.item())

    def _decode(self, index: int) -> Any:
        """The decoded file(s) of item ``index``; raises ``UnreadableImageError`` on unreadable files."""
        raise NotImplementedError

    def _decode_item(self, index: int) -> tuple[Any, int]:
        """``(decoded item, index of the file used)`` under the ``unreadable`` rule."""
        if self.unreadable == "error":
            return self._decode(index), index
        return self._decode_skipping(index)

    def _decode_skipping(self, index: int) -> tuple[Any, int]:
        """``(_decode(i), i)`` for the first readable ``i`` from ``index`` on (wrapping around)."""
        for step in range(min(self.max_consecutive_skips, len(self.files))):
            current = (index + step) % len(self.files)
            try:
                return self._decode(current), current
            except UnreadableImageError as error:
                self._skip(current, error.__cause__ or error)
        tried = min(self.max_consecutive_skips, len(self.files))
        raise RuntimeError(f"{tried} files in a row from {self.files[index]} could not be read; is the data set "
                           "corrupt? (warnings name each file)")

    def _skip(self, index: int, error: BaseException) -> None:
        self._skipped += 1
        path = self.files[index]
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"skipping unreadable image {path}: {error}", CorruptImageWarning, stacklevel=4)


class ImageFiles(_FileReader):
    """Images from files with optional labels: item ``i`` is ``(transform(image), label)``, label -1 if none.

    Args:
        files: image paths.
        labels: one class index per file, or ``None``.
        transform: applied to the RGB uint8 ``(3, H, W)`` image; identity when ``None``.
        unreadable: ``"skip"`` (pretraining: the next readable file takes the place of an unreadable one) or
            ``"error"`` (evaluation: ``UnreadableImageError`` naming the file).
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None = None,
                 transform: Callable[[Tensor], Any] | None = None, unreadable: Unreadable = "skip") -> None:
        super().__init__(files, unreadable)
        if labels is not None and len(labels) != len(self.files):
            raise ValueError(f"{len(labels)} labels for {len(self.files)} files")
        self.labels = list(labels) if labels is not None else None
        self.transform = transform

    def label(self, index: int) -> int:
        return self.labels[index] if self.labels is not None else -1

    def _decode(self, index: int) -> Tensor:
        return _read_named(read_image, self.files[index])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, used = self._decode_item(index)
        return (self.transform(image) if self.transform is not None else image), self.label(used)


class MultiCropImages(ImageFiles):
    """Training items ``(ViewSample, label, index)`` for ``collate_views``; ``transform`` is a ``MultiCropViews``.

    Optional ContrastiveCrop guides (``set_crop_guides``): one box per image in a table in shared memory,
    updated in place, so that the loader's worker processes — persistent ones included — draw their next
    crops around the new boxes. The first ``set_crop_guides`` call must come before the workers of the
    loader that should see the guides start (Lightning: in ``on_fit_start``, before the first epoch's
    loader exists; BAM does this); a worker started earlier refuses to go on with a clear error rather
    than silently ignoring them. Update between epochs: a worker reading a box while it is being written
    could see a half-written one.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None = None,
                 transform: Callable[[Tensor], Any] | None = None, seed: int = 0) -> None:
        super().__init__(files, labels, transform)
        self.seed = int(seed)
        self._guides: Tensor | None = None  # (N, 4) in shared memory once set; NaN rows: no guide
        # [number of set_crop_guides calls, alpha], in shared memory from the start so every worker sees it
        self._guide_state = torch.tensor([0.0, 0.6], dtype=torch.float64).share_memory_()

    def set_crop_guides(self, boxes: Tensor | None, alpha: float = 0.6) -> None:
        """Draw the crops of image ``i`` around ``boxes[i]`` by ContrastiveCrop from the next item on.

        Args:
            boxes: ``(N, 4)`` normalised ``(y0, x0, y1, x1)`` in the order of ``files``; a row of NaN leaves
                that image to RandomResizedCrop. ``None``: RandomResizedCrop for all images.
            alpha: parameter of the ``Beta(alpha, alpha)`` position draw (0.6 in BAM).
        """
        if not isinstance(self.transform, MultiCropViews):
            raise TypeError(f"crop guides need the MultiCropViews transform, this data set has "
                            f"{type(self.transform).__name__}: build the DataModule with views=MultiCropViews(...) "
                            "or a preset name")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha}: the Beta(alpha, alpha) of ContrastiveCrop needs alpha > 0 (0.6 in BAM)")
        if boxes is not None:
            boxes = check_guide_boxes(boxes, len(self))
        if self._guides is None:
            self._guides = torch.full((len(self), 4), math.nan).share_memory_()
        if boxes is None:
            self._guides.fill_(math.nan)
        else:
            self._guides.copy_(boxes)
        self._guide_state[1] = float(alpha)
        self._guide_state[0] += 1

    @property
    def crop_guides(self) -> Tensor | None:
        """A copy of the guide table ``(N, 4)`` (NaN rows: no guide), or ``None`` when no image has a guide."""
        if self._guides is None or self._guides.isnan().all():
            return None
        return self._guides.clone()

    @property
    def crop_guide_alpha(self) -> float:
        return float(self._guide_state[1])

    def _guide(self, index: int) -> list[float] | None:
        if self._guides is None:
            if self._guide_state[0] > 0:
                raise RuntimeError(
                    "crop guides were set after this loader's worker processes had started, so they cannot see "
                    "them: call set_crop_guides (None is fine) before the training loader's workers start, e.g. "
                    "in LightningModule.on_fit_start, or use num_workers=0")
            return None
        box = self._guides[index].tolist()
        return None if math.isnan(box[0]) else box

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[ViewSample, int, int]:
        """Item ``index`` for ``key = index`` (views from the global RNG) or ``key = (epoch, index)``: views
        drawn from ``item_generator(seed, epoch, index)``, a pure function of the three (what
        ``datamodules.ResumableSampler`` yields)."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        image, used = self._decode_item(index)
        if self.transform is None:
            return image, self.label(used), used
        if not isinstance(self.transform, MultiCropViews):
            return self.transform(image), self.label(used), used
        generator = None if epoch is None else item_generator(self.seed, epoch, index)
        guide = self._guide(used)
        if guide is None:
            item = self.transform(image, generator=generator)
        else:
            item = self.transform(image, guide=guide, alpha=self.crop_guide_alpha, generator=generator)
        return item, self.label(used), used


class SegmentationPairs(_FileReader):
    """Image-mask pairs of evaluation data: item ``i`` is ``transform(image, mask)``.

    Mask values must be class indices in ``[0, num_classes)`` or ``ignore_index``; anything else raises
    ``UnknownMaskValueError`` naming the file, or with ``unknown_values="ignore"`` is mapped to
    ``ignore_index`` with a warning. A mask of another size than its image raises ``MaskFormatError``; an
    unreadable image or mask raises ``UnreadableImageError`` naming it.

    Args:
        images: image paths.
        masks: mask paths, one per image (palette or grayscale PNGs of class indices).
        transform: joint transform of a uint8 image ``(3, H, W)`` and a uint8 mask ``(H, W)``.
        num_classes: number of classes, background included.
        ignore_index: the "don't care" value.
        unknown_values: ``"error"`` or ``"ignore"``.
    """

    #: what the unknown-value error suggests (the DataModules' option)
    unknown_values_fix = "fix the mask or pass unknown_mask_values='ignore' to map them to the ignore value"

    def __init__(self, images: Sequence[Path], masks: Sequence[Path],
                 transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], num_classes: int,
                 ignore_index: int = 255, unknown_values: str = "error") -> None:
        super().__init__(images, unreadable="error")
        if len(masks) != len(self.files):
            raise ValueError(f"{len(masks)} masks for {len(self.files)} images")
        if unknown_values not in ("error", "ignore"):
            raise ValueError(f"unknown_values={unknown_values!r}; use 'error' or 'ignore'")
        self.masks = [Path(m) for m in masks]
        self.transform = transform
        self.num_classes, self.ignore_index, self.unknown_values = num_classes, ignore_index, unknown_values

    def _decode(self, index: int) -> tuple[Tensor, Tensor]:
        image = _read_named(read_image, self.files[index])
        mask = self._checked(_read_named(read_mask, self.masks[index]), self.masks[index])
        if image.shape[-2:] != mask.shape:
            raise MaskFormatError(_size_mismatch(self.masks[index], tuple(mask.shape), self.files[index],
                                                 tuple(image.shape[-2:])))
        return image, mask

    def _checked(self, mask: Tensor, path: Path) -> Tensor:
        unknown = (mask >= self.num_classes) & (mask != self.ignore_index)
        if not unknown.any():
            return mask
        values = sorted(set(mask[unknown].tolist()))
        message = (f"{path} holds mask values {values[:10]} outside the classes 0..{self.num_classes - 1} and "
                   f"the ignore value {self.ignore_index}")
        if self.unknown_values == "error":
            raise UnknownMaskValueError(f"{message}; {self.unknown_values_fix}")
        warnings.warn(message + f"; mapped to {self.ignore_index}", stacklevel=2)
        return mask.masked_fill(unknown, self.ignore_index)

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """The checked uint8 image ``(3, H, W)`` and mask ``(H, W)`` of item ``index``, before the transform."""
        return self._decode(index)

    def check_mask_sizes(self) -> None:
        """A ``MaskFormatError`` naming the first mask whose size differs from its image's, read from the file
        headers only (cheap enough to check a whole set before any work)."""
        for image, mask in zip(self.files, self.masks):
            with Image.open(image) as a, Image.open(mask) as b:
                if a.size != b.size:
                    raise MaskFormatError(_size_mismatch(mask, b.size[::-1], image, a.size[::-1]))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(*self.read(index))


def _size_mismatch(mask: Path, mask_size: tuple[int, ...], image: Path, image_size: tuple[int, ...]) -> str:
    return (f"{mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {image_size[0]}x{image_size[1]}; "
            "every mask must have its image's size")
