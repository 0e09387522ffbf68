"""``ImageFolderDataModule``: any folder tree of images, labelled by sub-folder or unlabelled."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .base import ClassificationDataMixin, ImageList, LayoutError, PretrainDataModule, check_not_empty, require_dir
from .imagenet import class_folders, labelled_images
from .reading import list_images

__all__ = ["ImageFolderDataModule"]

LABELLED = "<root>/<class>/**/<image> (one sub-folder per class)"
UNLABELLED = "image files anywhere under <root>"


class ImageFolderDataModule(ClassificationDataMixin, PretrainDataModule):
    """Pretraining on every image under ``root``; with ``labelled``, the first-level sub-folders are classes.

    Labelled data is classification-capable (probes): the validation images come from ``val_root`` (the same
    class folders), or from a ``val_fraction`` of each class held out of ``root`` with a fixed seed (held-out
    images are then not used for pretraining either). Unlabelled data has no ``num_classes``.

    Args:
        root: the folder of images.
        labelled: whether the first-level sub-folders of ``root`` are classes.
        val_root: a folder with the same class sub-folders for the probes' validation split.
        val_fraction: without ``val_root``, the fraction of each class held out for validation.
        split_seed: seed of that hold-out.
        **kwargs: loader and view arguments of ``PretrainDataModule``.
    """

    def __init__(self, root: str, labelled: bool = False, val_root: str | None = None, val_fraction: float = 0.0,
                 split_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        self.root = Path(root).expanduser()
        self.labelled = labelled
        self.val_root = Path(val_root).expanduser() if val_root is not None else None
        self.val_fraction, self.split_seed = val_fraction, split_seed

    @property
    def has_labels(self) -> bool:
        return self.labelled

    def train_images(self) -> ImageList:
        if not self.labelled:
            return self.memoized("unlabelled", self._unlabelled_images)
        return self.eval_images("train")

    def _unlabelled_images(self) -> ImageList:
        root = require_dir(self.root, UNLABELLED)
        return check_not_empty(ImageList(list_images(root)), root, UNLABELLED)

    def eval_images(self, split: str) -> ImageList:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        if not self.labelled:
            raise RuntimeError("ImageFolderDataModule(labelled=False) has no labels; set labelled=True with one "
                               "sub-folder per class to use the classification probes")
        if split == "val" and self.val_root is not None:
            return self.memoized("val_root", lambda: labelled_images(self.val_root, self._classes(), LABELLED))
        if split == "val" and self.val_fraction == 0.0:
            raise LayoutError(f"{self.root} has no validation images; pass val_root=<folder with the same class "
                              "sub-folders> or val_fraction > 0")
        train, val = self.memoized("holdout", self._hold_out)
        return train if split == "train" else val

    def _classes(self) -> list[str]:
        def scan() -> list[str]:
            root = require_dir(self.root, LABELLED)
            classes = class_folders(root)
            if not classes:
                raise LayoutError(f"{root} has no sub-folders; expected {LABELLED} (or pass labelled=False)")
            if list_images(root, recursive=False):
                warnings.warn(f"{root} holds images outside the class folders; they are ignored", stacklevel=2)
            return classes
        return self.memoized("classes", scan)

    def _hold_out(self) -> tuple[ImageList, ImageList]:
        """Split every class of ``root`` into train and held-out validation images with a fixed seed."""
        images = labelled_images(self.root, self._classes(), LABELLED)
        assert images.labels is not None
        generator = torch.Generator().manual_seed(self.split_seed)
        labels = torch.tensor(images.labels)
        is_val = torch.zeros(len(labels), dtype=torch.bool)
        fraction = 0.0 if self.val_root is not None else self.val_fraction
        if fraction > 0:
            for label in labels.unique():
                members = torch.nonzero(labels == label).flatten()
                count = round(fraction * len(members))
                chosen = members[torch.randperm(len(members), generator=generator)[:count]]
                is_val[chosen] = True
        keep = [ImageList([f for f, v in zip(images.files, is_val.tolist()) if v == flag],
                          [y for y, v in zip(images.labels, is_val.tolist()) if v == flag], images.classes)
                for flag in (False, True)]
        return check_not_empty(keep[0], self.root, LABELLED), keep[1]
