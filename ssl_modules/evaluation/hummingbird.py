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
import torch.nn.functional as F
from torch import Tensor

from ssl_modules.run.distributed import gather_in_index_order

from ssl_modules.evaluation.datasets import EvalDataError, voc_split
from ssl_modules.evaluation.features import Extractor, dense_map, progress
from ssl_modules.evaluation.metrics import confusion_matrix, hungarian_miou, miou_all_classes, sum_over_processes
from ssl_modules.evaluation.search import FlatIndex
from ssl_modules.evaluation.transforms import (
    IMAGENET_STD, OPEN_HB_STD, hummingbird_memory_augment, normalise, sample_generator, squash,
)

__all__ = ["HummingbirdSettings", "patch_labels", "rare_class_patch_scores", "sample_memory_patches",
           "retrieve_labels", "run_hummingbird"]


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


def patch_labels(masks: Tensor, grid: tuple[int, int], num_classes: int, background_for_ignore: bool) -> Tensor:
    """``(B, h * w, K)``: each patch's fraction of pixels per class. 255 counts as background (open-HB) or
    is left out (``background_for_ignore=False``; a patch of only 255 then gets all zeros)."""
    masks = masks.long()
    height, width = masks.shape[-2:]
    if height % grid[0] or width % grid[1]:
        raise ValueError(f"masks of {height}x{width} px do not split into a {grid} grid of equal patches")
    if background_for_ignore:
        masks = torch.where(masks == 255, 0, masks)
    one_hot = F.one_hot(torch.where(masks == 255, num_classes, masks), num_classes + 1)[..., :num_classes].float()
    patches = F.avg_pool2d(one_hot.permute(0, 3, 1, 2), (height // grid[0], width // grid[1]))
    if not background_for_ignore:
        patches = patches / patches.sum(1, keepdim=True).clamp(min=1e-12)
    return patches.flatten(2).transpose(1, 2)


def rare_class_patch_scores(labels: Tensor) -> Tensor:
    """open-HB's per-image patch score ``(N,)``: the summed frequency (number of the image's patches holding
    the class) of the classes present in the patch; patches of rare classes score low."""
    present = labels > 0
    frequency = present.sum(0).float()
    return (present.float() * frequency).sum(1)


def sample_memory_patches(labels: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Indices of the ``count`` patches of one image with the lowest ``score * U(0, 1)`` (open-HB's sampling);
    patches with no labelled pixel score 1e6."""
    scores = rare_class_patch_scores(labels.cpu())
    labelled = labels.sum(1).cpu() > 0
    scores = torch.where(labelled, scores * torch.rand(scores.shape, generator=generator), torch.tensor(1e6))
    return scores.topk(min(count, scores.numel()), largest=False).indices


def retrieve_labels(queries: Tensor, index: FlatIndex, memory_labels: Tensor, k: int, temperature: float) -> Tensor:
    """``(Q, K)`` label estimates: the ``k`` neighbours' labels weighted by ``softmax(sim / temperature)``."""
    similarities, neighbours = index.search(F.normalize(queries, dim=-1), k)
    weights = torch.softmax(similarities.float() / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, memory_labels.to(neighbours.device)[neighbours].float())


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


def build_memory(extractor: Extractor, root: str, settings: HummingbirdSettings) -> tuple[Tensor, Tensor]:
    """Memory features ``(M, C)`` (l2-normalised) and labels ``(M, K)``, the same on every process."""
    base = voc_split(root, "train", _ValTransform(settings), settings.num_classes)
    per_image = None
    if settings.memory_size is not None:
        per_image = settings.memory_size // (len(base) * settings.augmentation_epochs)
        if per_image < 1:
            raise ValueError(f"hummingbird: memory_size={settings.memory_size} is smaller than the "
                             f"{len(base) * settings.augmentation_epochs} augmented memory images")
    features, labels, owners = [], [], []
    for pass_number in range(settings.augmentation_epochs):
        dataset = base.with_transform(_MemoryTransform(settings, pass_number))
        batches = extractor.my_batches(len(dataset))
        loader = extractor.loader(dataset, batches)
        desc = f"hummingbird: memory pass {pass_number + 1}/{settings.augmentation_epochs}"
        for batch, (images, masks) in zip(batches, progress(loader, len(batches), desc, extractor.show_progress)):
            maps = dense_map(extractor.embed(images))
            tokens = F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)
            distributions = patch_labels(masks.to(maps.device), tuple(maps.shape[-2:]), settings.num_classes,
                                         settings.background_for_ignore)
            for row, image_index in enumerate(batch):
                keep = _kept_patches(distributions[row], per_image, settings.seed, pass_number, image_index)
                keep = keep.to(maps.device)
                features.append(tokens[row, keep])
                labels.append(distributions[row, keep])
                owner = pass_number * len(dataset) + image_index
                owners.append(torch.full((keep.numel(),), owner, dtype=torch.long, device=maps.device))
    if not features:
        raise EvalDataError("hummingbird: this process embedded no memory image")
    _, memory, memory_labels = gather_in_index_order(torch.cat(owners), torch.cat(features), torch.cat(labels))
    return memory, memory_labels


def _kept_patches(labels: Tensor, per_image: int | None, seed: int, pass_number: int, index: int) -> Tensor:
    if per_image is None:
        return (labels.sum(1) > 0).nonzero().flatten()
    # A generator of its own (offset from the augmentation's) so the sample does not depend on the batch.
    return sample_memory_patches(labels, per_image, sample_generator(seed + 7919, pass_number, index))


@torch.no_grad()
def run_hummingbird(extractor: Extractor, root: str, settings: HummingbirdSettings
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, floors)`` of the retrieval protocol on a VOC root."""
    memory, memory_labels = build_memory(extractor, root, settings)
    index = FlatIndex(memory, settings.backend)  # type: ignore[arg-type]
    val = voc_split(root, "val", _ValTransform(settings), settings.num_classes)
    batches = extractor.my_batches(len(val))
    confusion = torch.zeros(settings.num_classes, settings.num_classes, dtype=torch.long, device=extractor.device)
    loader = extractor.loader(val, batches) if batches else []
    for images, masks in progress(loader, len(batches), "hummingbird: validation", extractor.show_progress):
        maps = dense_map(extractor.embed(images))
        batch, channels, height, width = maps.shape
        scores = retrieve_labels(maps.flatten(2).transpose(1, 2).reshape(-1, channels), index, memory_labels,
                                 settings.k, settings.temperature)
        scores = scores.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        scores = F.interpolate(scores, size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        confusion += confusion_matrix(masks.to(scores.device), scores.argmax(1), settings.num_classes).to(confusion)
    confusion = sum_over_processes(confusion)
    miou, _ = hungarian_miou(confusion)
    metrics = {"miou": miou, "miou_identity": miou_all_classes(confusion), "memory_entries": float(memory.shape[0])}
    return metrics, segmentation_floors(confusion)


def segmentation_floors(confusion: Tensor) -> dict[str, float]:
    """mIoU (over all classes) of predicting background everywhere, and of predicting the most frequent
    class everywhere (the best a one-class answer gets after Hungarian matching)."""
    counts = confusion.sum(1).double()
    fractions = counts / counts.sum().clamp(min=1)
    classes = confusion.shape[0]
    return {"all_background_miou": float(fractions[0] / classes), "one_class_miou": float(fractions.max() / classes)}
