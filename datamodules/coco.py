"""``COCODataModule``: unlabelled pretraining on the images of a COCO split."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from .base import ImageList, LayoutError, PretrainDataModule, check_not_empty, require_dir
from .reading import list_images

__all__ = ["COCODataModule", "read_instances"]

LAYOUT = "<root>/train2017/*.jpg, <root>/val2017/*.jpg and <root>/annotations/instances_<split>.json"


def read_instances(path: Path) -> dict[str, Any]:
    """The parsed ``instances_*.json`` (plain ``json``: pycocotools is not needed)."""
    if not path.is_file():
        raise LayoutError(f"{path} not found; expected {LAYOUT}")
    try:
        with open(path) as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayoutError(f"{path} is not valid JSON ({error}); expected a COCO instances file "
                          "(download it again: the file may be truncated)") from None
    if not isinstance(data, dict) or "images" not in data:
        raise LayoutError(f"{path} is not a COCO instances file (no 'images' list)")
    return data


class COCODataModule(PretrainDataModule):
    """COCO images for pretraining, without labels (the methods use none).

    ``image_filter`` chooses the images: ``"all"`` every image file of the split folder (including images
    without annotations; the json is not read), ``"listed"`` those listed in the split's
    ``annotations/instances_<split>.json``, ``"annotated"`` those with at least one instance annotation.

    Args:
        root: the folder holding ``train2017/``, ``val2017/`` and ``annotations/``.
        split: the image folder used for pretraining.
        image_filter: ``"all"``, ``"listed"`` or ``"annotated"``.
        **kwargs: loader and view arguments of ``PretrainDataModule``.
    """

    def __init__(self, root: str, split: str = "train2017",
                 image_filter: Literal["all", "listed", "annotated"] = "all", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if image_filter not in ("all", "listed", "annotated"):
            raise ValueError(f"image_filter={image_filter!r}; use 'all', 'listed' or 'annotated'")
        self.root = Path(root).expanduser()
        self.split, self.image_filter = split, image_filter

    def annotation_file(self, split: str | None = None) -> Path:
        """``<root>/annotations/instances_<split>.json``."""
        return self.root / "annotations" / f"instances_{split or self.split}.json"

    def train_images(self) -> ImageList:
        return self.memoized("train", self._scan)

    def _scan(self) -> ImageList:
        folder = require_dir(require_dir(self.root, LAYOUT) / self.split, LAYOUT)
        if self.image_filter == "all":
            return check_not_empty(ImageList(list_images(folder, recursive=False)), folder, LAYOUT)
        data = read_instances(self.annotation_file())
        names = self._filtered_names(data)
        files = [folder / name for name in sorted(names)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise LayoutError(f"{len(missing)} images listed in {self.annotation_file()} are not in {folder} "
                              f"(e.g. {missing[0].name})")
        return check_not_empty(ImageList(files), folder, f"images with annotations in {self.annotation_file()}")

    def _filtered_names(self, data: dict[str, Any]) -> set[str]:
        if self.image_filter == "listed":
            return {image["file_name"] for image in data["images"]}
        annotated = {annotation["image_id"] for annotation in data.get("annotations", [])}
        return {image["file_name"] for image in data["images"] if image["id"] in annotated}
