"""``hummingbird``: dense nearest-neighbour retrieval (Balazevic et al. 2023) as open-hummingbird-eval computes it.

Protocol (open-hummingbird-eval 2.0, ``hbird/hbird_eval.py``):

1. Memory: every training image (VOC ``train_aug``), augmented ``augmentation_epochs`` times (shared
   ``RandomResizedCrop(input_size, scale=(0.5, 2.0))`` of image and mask, colour jitter on the image); mask
   pixels 255 become background (0) before each patch's label — the fraction of its pixels in each class —
   is taken. With ``memory_size`` set, each image keeps ``memory_size // (images * augmentation_epochs)``
   patches: those with the lowest ``sum(per-image class frequency of the patch's classes) * U(0, 1)``,
   which favours patches of rare classes. Features are l2-normalised.
2. Each validation patch (image and mask squashed to ``input_size``) finds its ``k = 30`` most similar memory
   entries (exact inner product), weighs their labels by ``softmax(sim / 0.02)``; the class scores are
   upsampled bilinearly to the mask, argmax.
3. mIoU over all classes after Hungarian matching of predicted to ground-truth classes, 255 ignored; the
   identity-matching mIoU is reported too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_modules.evaluation.datasets import EvalDataError
from ssl_modules.evaluation.features import Extractor, dense_map
from ssl_modules.evaluation.layouts import segmentation_split
from ssl_modules.evaluation.metrics import (
    confusion_counts,
    hungarian_miou,
    miou_all_classes,
    segmentation_floors,
    update_all,
)
from ssl_modules.evaluation.retrieval import label_maps, memory_entries, patch_labels, sample_memory_patches
from ssl_modules.evaluation.search import FlatIndex
from ssl_modules.evaluation.transforms import (
    IMAGENET_STD,
    OPEN_HB_STD,
    hummingbird_memory_augment,
    normalise,
    sample_generator,
    squash,
)
from ssl_modules.run.distributed import gather_in_index_order

__all__ = ["HummingbirdSettings", "build_memory", "run_hummingbird"]


@dataclass(frozen=True)
class HummingbirdSettings:
    """Settings of the retrieval protocol; the defaults are open-hummingbird-eval's README protocol
    (CrIBo, Lebailly et al. 2024, dense nearest-neighbour retrieval on Pascal VOC)."""

    input_size: int = 512
    memory_size: int | None = 10_240_000
    augmentation_epochs: int = 2
    k: int = 30
    temperature: float = 0.02
    background_for_ignore: bool = True
    std: str = "imagenet"
    num_classes: int = 21
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.augmentation_epochs < 1:
            raise ValueError(f"hummingbird: k={self.k} and augmentation_epochs={self.augmentation_epochs} must be "
                             f">= 1, temperature={self.temperature} > 0")
        if self.memory_size is not None and self.memory_size < 1:
            raise ValueError(f"hummingbird: memory_size={self.memory_size} must be >= 1 or None (every patch)")
        if self.std not in ("imagenet", "open-hb"):
            raise ValueError(f"hummingbird: std={self.std!r}; use 'imagenet' or 'open-hb' (its 0.255 typo)")


class _MemoryTransform:
    def __init__(self, settings: HummingbirdSettings, pass_number: int) -> None:
        self.settings, self.pass_number = settings, pass_number

    def __call__(self, image: Tensor, mask: Tensor, index: int) -> tuple[Tensor, Tensor]:
        s = self.settings
        image, mask = hummingbird_memory_augment(image, mask, s.input_size,
                                                 sample_generator(s.seed, self.pass_number, index))
        return normalise(image, OPEN_HB_STD if s.std == "open-hb" else IMAGENET_STD), mask


class _ValTransform:
    def __init__(self, settings: HummingbirdSettings) -> None:
        self.settings = settings

    def __call__(self, image: Tensor, mask: Tensor, index: int) -> tuple[Tensor, Tensor]:
        image, mask = squash(image, mask, self.settings.input_size)
        return normalise(image, OPEN_HB_STD if self.settings.std == "open-hb" else IMAGENET_STD), mask


def build_memory(extractor: Extractor, root: str, settings: HummingbirdSettings, dataset: str = "voc"
                 ) -> tuple[Tensor, Tensor]:
    """Memory features ``(M, C)`` (l2-normalised) and labels ``(M, K)``, the same on every process."""
    base = segmentation_split(dataset, root, "train", _ValTransform(settings), "hummingbird", settings.num_classes)
    per_image = None
    if settings.memory_size is not None:
        per_image = settings.memory_size // (len(base) * settings.augmentation_epochs)
        if per_image < 1:
            raise ValueError(f"hummingbird: memory_size={settings.memory_size} is smaller than the "
                             f"{len(base) * settings.augmentation_epochs} augmented memory images")
    parts = []
    for pass_number in range(settings.augmentation_epochs):
        dataset = base.with_transform(_MemoryTransform(settings, pass_number))
        batches = extractor.my_batches(len(dataset))
        desc = f"hummingbird: memory pass {pass_number + 1}/{settings.augmentation_epochs}"

        def choose(labels: Tensor, image: int, pass_number: int = pass_number) -> Tensor:
            return _kept_patches(labels, per_image, settings.seed, pass_number, image)

        for batch, (images, masks) in zip(batches, extractor.progress(extractor.loader(dataset, batches),
                                                                      len(batches), desc)):
            maps = dense_map(extractor.embed(images))
            labels = patch_labels(masks.to(maps.device), tuple(maps.shape[-2:]), settings.num_classes,
                                  settings.background_for_ignore, open_hb=True)
            parts.append(memory_entries(maps, labels, batch, choose, pass_number * len(dataset)))
    if not parts:
        raise EvalDataError("hummingbird: this process embedded no memory image")
    features, labels, owners = (torch.cat(values) for values in zip(*parts))
    _, memory, memory_labels = gather_in_index_order(owners, features, labels)
    return memory, memory_labels


def _kept_patches(labels: Tensor, per_image: int | None, seed: int, pass_number: int, index: int) -> Tensor:
    if per_image is None:
        return (labels.sum(1) > 0).nonzero().flatten()
    # A generator of its own (offset from the augmentation's) so the sample does not depend on the batch.
    return sample_memory_patches(labels, per_image, sample_generator(seed + 7919, pass_number, index))


@torch.no_grad()
def run_hummingbird(extractor: Extractor, root: str, settings: HummingbirdSettings, dataset: str = "voc"
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, floors)`` of the retrieval protocol on a segmentation root (``dataset``: one of
    ``layouts.SEGMENTATION_DATASETS``, default Pascal VOC)."""
    memory, memory_labels = build_memory(extractor, root, settings, dataset)
    index = FlatIndex(memory, settings.backend)  # type: ignore[arg-type]
    val = segmentation_split(dataset, root, "val", _ValTransform(settings), "hummingbird", settings.num_classes)
    batches = extractor.my_batches(len(val))
    counts = confusion_counts(settings.num_classes, extractor.device)
    loader = extractor.loader(val, batches) if batches else []
    for images, masks in extractor.progress(loader, len(batches), "hummingbird: validation"):
        maps = dense_map(extractor.embed(images))
        predictions = label_maps(maps, index, memory_labels, settings.k, settings.temperature, masks.shape[-2:])
        update_all({"confusion": counts}, predictions, masks.to(predictions.device))
    confusion = counts.compute()
    miou, _ = hungarian_miou(confusion)
    metrics = {"miou": miou, "miou_identity": miou_all_classes(confusion), "memory_entries": float(memory.shape[0])}
    return metrics, segmentation_floors(confusion)
