"""``ImageNetDataModule``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, labels kept for the probes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ClassificationDataMixin, ImageList, LayoutError, PretrainDataModule, check_not_empty, require_dir
from .reading import list_images

__all__ = ["ImageNetDataModule", "class_folders", "labelled_images"]

LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (one sub-folder per class)"


def class_folders(folder: Path) -> list[str]:
    """Names of the sub-folders of ``folder``, sorted (hidden ones skipped): the classes, in label order."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def labelled_images(folder: Path, classes: list[str], expected: str) -> ImageList:
    """Images of ``folder/<class>/**`` labelled by the position of ``<class>`` in ``classes``.

    Sub-folders that are not in ``classes`` are an error (a validation class unknown to training).
    """
    present = class_folders(require_dir(folder, expected))
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise LayoutError(f"{folder} has class folders {unknown[:5]} that the training split lacks; "
                          f"expected {expected} with the same classes in both splits")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if name in present:
            found = list_images(folder / name)
            files += found
            labels += [label] * len(found)
    if not files and list_images(folder, recursive=False):
        raise LayoutError(f"{folder} holds images but no class folders; expected {expected}")
    return check_not_empty(ImageList(files, labels, classes), folder, expected)


class ImageNetDataModule(ClassificationDataMixin, PretrainDataModule):
    """ImageNet (or any data set in its layout): pretraining on ``train``, probes on ``train``/``val``.

    Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``; the classes are the sorted
    folder names of ``train`` (ImageNet's usual label order), kept as labels for the probes (the methods
    ignore them). The validation split must be in class folders too (the ILSVRC tarball's flat ``val/`` has
    to be sorted into them first).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        train_split: name of the training folder.
        val_split: name of the validation folder.
        **kwargs: loader and view arguments of ``PretrainDataModule`` (``batch_size``, ``num_workers``,
            ``views``, ``eval_size``, ...).
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.splits = {"train": train_split, "val": val_split}

    def _classes(self) -> list[str]:
        def scan() -> list[str]:
            train = require_dir(require_dir(self.root, LAYOUT) / self.splits["train"], LAYOUT)
            classes = class_folders(train)
            if not classes:
                raise LayoutError(f"{train} has no class folders; expected {LAYOUT}")
            return classes
        return self.memoized("classes", scan)

    def eval_images(self, split: str) -> ImageList:
        if split not in self.splits:
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        folder = self.root / self.splits[split]
        return self.memoized(("images", split), lambda: labelled_images(folder, self._classes(), LAYOUT))

    def train_images(self) -> ImageList:
        return self.eval_images("train")

    def val_dataloader(self) -> Any:
        """The validation loader, or none when the root has no validation folder: pretraining and the probes
        that read ``train`` need none (a probe that needs ``val`` names the missing folder itself)."""
        if not (self.root / self.splits["val"]).is_dir():
            return []
        return super().val_dataloader()
