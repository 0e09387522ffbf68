"""Dense nearest-neighbour retrieval ("in-context scene understanding", Balazevic et al. 2023), shared by the
``hummingbird`` protocol and ``DenseRetrievalProbe``.

A memory holds l2-normalised patch features, each with its patch label (the fraction of the patch's pixels
in each class); a query patch takes the labels of its ``k`` most similar memory entries, averaged with
weights ``softmax(similarity / temperature)``; the class scores are upsampled bilinearly to the mask, argmax.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_modules.evaluation.metrics import IGNORE_INDEX
from ssl_modules.evaluation.search import FlatIndex

__all__ = ["patch_labels", "retrieval_scores", "retrieve_labels", "label_maps", "upsample_logits", "sample_patches",
           "rare_class_patch_scores", "sample_memory_patches", "memory_entries"]

#: ``(labels of one image's patches (N, K), image id) -> indices of the patches kept in the memory``
PatchChoice = Callable[[Tensor, int], Tensor]


def patch_labels(masks: Tensor, grid: tuple[int, int], num_classes: int, background_for_ignore: bool = False,
                 open_hb: bool = False) -> Tensor:
    """``(B, h * w, K)``: each patch's fraction of pixels per class (row-major patches).

    Pixels labelled 255 count as background with ``background_for_ignore`` (open-hummingbird-eval's rule),
    else they are left out and the fractions are taken over the labelled pixels (a patch of only 255 gets
    all zeros). Patches are the cells of an adaptive average pooling of the mask to ``grid``; ``open_hb=True``
    does open-hummingbird-eval's arithmetic instead: exact patches (the mask side a multiple of the grid),
    and with ``background_for_ignore`` the pooled fractions as they are.
    """
    masks = masks.long()
    height, width = masks.shape[-2:]
    if open_hb and (height % grid[0] or width % grid[1]):
        raise ValueError(f"masks of {height}x{width} px do not split into a {grid} grid of equal patches")
    if background_for_ignore:
        masks = torch.where(masks == IGNORE_INDEX, 0, masks)
    one_hot = F.one_hot(torch.where(masks == IGNORE_INDEX, num_classes, masks), num_classes + 1)[..., :num_classes]
    one_hot = one_hot.permute(0, 3, 1, 2).float()
    if open_hb:
        fractions = F.avg_pool2d(one_hot, (height // grid[0], width // grid[1]))
    else:
        fractions = F.adaptive_avg_pool2d(one_hot, grid)
    if not (open_hb and background_for_ignore):
        totals = fractions.sum(dim=1, keepdim=True)
        fractions = torch.where(totals > 0, fractions / totals.clamp(min=1e-12), torch.zeros_like(fractions))
    return fractions.flatten(2).transpose(1, 2)


def retrieval_scores(similarities: Tensor, neighbour_labels: Tensor, temperature: float) -> Tensor:
    """Label distribution of every query ``(Q, K)``: the neighbours' labels ``(Q, k, K)`` averaged with weights
    ``softmax(similarities / temperature)`` over the ``k`` neighbours."""
    weights = torch.softmax(similarities.float() / temperature, dim=1)
    return torch.bmm(weights[:, None, :], neighbour_labels.float())[:, 0]


def retrieve_labels(queries: Tensor, index: FlatIndex, memory_labels: Tensor, k: int, temperature: float) -> Tensor:
    """``(Q, K)`` label estimates of raw query features ``(Q, C)`` (l2-normalised here) against the memory."""
    similarities, neighbours = index.search(F.normalize(queries, dim=-1), k)
    return retrieval_scores(similarities, memory_labels.to(neighbours.device)[neighbours], temperature)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling of ``(B, K, h, w)`` scores to the mask size (``align_corners=False``)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def label_maps(maps: Tensor, index: FlatIndex, memory_labels: Tensor, k: int, temperature: float,
               size: Sequence[int]) -> Tensor:
    """Predicted pixel labels ``(B, H, W)`` of feature maps ``(B, C, h, w)`` by retrieval, at mask size ``size``."""
    batch, channels, height, width = maps.shape
    scores = retrieve_labels(maps.flatten(2).transpose(1, 2).reshape(-1, channels), index, memory_labels, k,
                             temperature)
    scores = scores.reshape(batch, height * width, -1).transpose(1, 2).reshape(batch, -1, height, width)
    return upsample_logits(scores, size).argmax(dim=1)


def sample_patches(labelled: Tensor, count: int | None, seed: int) -> Tensor:
    """Indices (ascending) of at most ``count`` labelled patches of one image, uniformly chosen with ``seed``;
    all labelled patches when ``count`` is ``None``."""
    candidates = labelled.nonzero().flatten()
    if count is None or candidates.numel() <= count:
        return candidates
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[chosen.to(candidates.device)].sort().values


def rare_class_patch_scores(labels: Tensor) -> Tensor:
    """open-HB's per-image patch score ``(N,)``: the summed frequency (number of the image's patches holding
    the class) of the classes present in the patch; patches of rare classes score low."""
    present = labels > 0
    frequency = present.sum(0).float()
    return (present.float() * frequency).sum(1)


def sample_memory_patches(labels: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Indices of the ``count`` patches of one image with the lowest ``score * U(0, 1)`` (open-HB's sampling,
    which favours rare classes); patches with no labelled pixel score 1e6."""
    scores = rare_class_patch_scores(labels.cpu())
    labelled = labels.sum(1).cpu() > 0
    scores = torch.where(labelled, scores * torch.rand(scores.shape, generator=generator), torch.tensor(1e6))
    return scores.topk(min(count, scores.numel()), largest=False).indices


def memory_entries(maps: Tensor, labels: Tensor, image_ids: Sequence[int], choose: PatchChoice,
                   owner_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The memory entries of a batch: l2-normalised features ``(E, C)``, patch labels ``(E, K)`` and owners
    ``(E,)`` (``owner_offset + image id``, the order to gather them in).

    Args:
        maps: feature maps ``(B, C, h, w)``.
        labels: their patch labels ``(B, h * w, K)`` (``patch_labels``).
        image_ids: the dataset index of each image.
        choose: which patches of an image enter the memory (``sample_patches``, ``sample_memory_patches``).
        owner_offset: added to the image ids (e.g. one block of ids per augmentation pass).
    """
    tokens = F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)
    features, kept, owners = [], [], []
    for row, image in enumerate(image_ids):
        keep = choose(labels[row], image).to(maps.device)
        features.append(tokens[row, keep])
        kept.append(labels[row, keep])
        owners.append(torch.full((keep.numel(),), owner_offset + image, dtype=torch.long, device=maps.device))
    if not features:
        return maps.new_zeros(0, maps.shape[1]), labels.new_zeros(0, labels.shape[-1]), \
            torch.zeros(0, dtype=torch.long, device=maps.device)
    return torch.cat(features), torch.cat(kept), torch.cat(owners)
