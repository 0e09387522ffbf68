"""``knn``: DINO's weighted k-NN classification (``eval_knn.py``'s ``knn_classifier``); its vote
(``weighted_knn_scores``) is also ``KNNProbe``'s.

The whole training set is the bank; bank and queries are l2-normalised float32 global features; each query's
``k`` most cosine-similar bank images vote for their class with weight ``exp(sim / T)``; classes are ranked by
their summed votes (ties broken as ``torch.sort`` does, as DINO does), giving top-1 and top-5.

Memory follows DINO's script: the bank is one float32 ``(N, D)`` matrix filled batch by batch (no batch of tokens
kept, no list of batches concatenated; ``ssl_modules.evaluation.features``), the search holds one normalised copy
of it, and a query chunk's similarity matrix is at most ``SIMILARITY_ELEMENTS`` entries
(``benchmarks/knn_memory.py`` measures the peak beside DINO's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_modules.evaluation.datasets import imagenet_split
from ssl_modules.evaluation.features import Extractor, global_vector
from ssl_modules.evaluation.transforms import normalise, resize_centre_crop
from ssl_modules.run import distributed

__all__ = ["KNNSettings", "SIMILARITY_ELEMENTS", "weighted_knn_scores", "query_chunk", "knn_classify", "run_knn",
           "classification_floors"]

#: the most entries of one query chunk's similarity matrix (512 MiB of float32)
SIMILARITY_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class KNNSettings:
    """Settings of the k-NN protocol (defaults: DINO, Caron et al. 2021, ``eval_knn.py``)."""

    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    image_size: int = 224
    chunk: int = 1024

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or self.temperature <= 0 or self.image_size < 1:
            raise ValueError(f"knn: ks={self.ks} must be >= 1, temperature={self.temperature} > 0")


def weighted_knn_scores(similarities: Tensor, neighbour_labels: Tensor, num_classes: int,
                        temperature: float) -> Tensor:
    """Class scores ``(Q, num_classes)``: every neighbour votes for its class with weight ``exp(sim / T)``.

    Args:
        similarities: ``(Q, k)`` cosine similarities of each query's neighbours.
        neighbour_labels: ``(Q, k)`` their class indices.
        num_classes: number of classes.
        temperature: ``T`` of the vote weights (0.07 in DINO).
    """
    weights = (similarities.float() / temperature).exp()
    scores = weights.new_zeros(similarities.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def query_chunk(bank_size: int, chunk: int) -> int:
    """Queries per similarity matrix: ``chunk``, or fewer so that the ``(rows, bank_size)`` float32 matrix holds
    at most ``SIMILARITY_ELEMENTS`` entries (DINO's ``eval_knn.py`` cuts the queries into 100 chunks; on
    ImageNet, 500 queries x 1.28 M bank entries)."""
    if chunk < 1:
        raise ValueError(f"knn: chunk={chunk} must be at least 1 query")
    return max(1, min(chunk, SIMILARITY_ELEMENTS // max(1, bank_size)))


def knn_classify(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int,
                 ks: tuple[int, ...], temperature: float, chunk: int = 1024) -> dict[int, tuple[int, int]]:
    """``{k: (top-1 correct, top-5 correct)}`` counts of weighted k-NN voting of ``queries`` against ``bank``.

    Inputs are raw features (normalised here). Queries are processed in chunks of at most ``chunk`` rows, fewer
    where a chunk's similarity matrix would exceed ``SIMILARITY_ELEMENTS`` (``query_chunk``).
    """
    bank = F.normalize(bank.float(), dim=1, eps=1e-12)
    queries = F.normalize(queries.float(), dim=1, eps=1e-12)
    k_max = min(max(ks), bank.shape[0])
    counts = {k: [0, 0] for k in ks}
    rows = query_chunk(bank.shape[0], chunk)
    for start in range(0, queries.shape[0], rows):
        similarity = queries[start:start + rows] @ bank.T
        values, neighbours = similarity.topk(k_max, dim=1, largest=True, sorted=True)
        labels = bank_labels.to(neighbours.device)[neighbours]
        targets = query_labels[start:start + rows].to(neighbours.device).long()
        for k in ks:
            kk = min(k, k_max)
            scores = weighted_knn_scores(values[:, :kk], labels[:, :kk], num_classes, temperature)
            ranked = scores.sort(dim=1, descending=True).indices
            correct = ranked.eq(targets[:, None])
            counts[k][0] += int(correct[:, :1].sum())
            counts[k][1] += int(correct[:, :min(5, kk, num_classes)].sum())
    return {k: (top1, top5) for k, (top1, top5) in counts.items()}


def run_knn(extractor: Extractor, root: str, settings: KNNSettings) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, floors)`` of the k-NN protocol on ``<root>/train`` (bank) and ``<root>/val`` (queries).

    Each process classifies its own share of the queries against the whole bank; the counts are summed.
    """
    def transform(image: Tensor, index: int) -> Tensor:
        return normalise(resize_centre_crop(image, settings.image_size))

    train, val = imagenet_split(root, "train", transform), imagenet_split(root, "val", transform)
    key = f"imagenet-global|{root}|{settings.image_size}"
    bank, bank_labels = extractor.extract(train, global_vector, key + "|train", "knn: train features")
    queries, labels = extractor.extract(val, global_vector, key + "|val", "knn: val features")
    rank, world = distributed.rank(), distributed.world_size()
    mine = torch.arange(queries.shape[0])[rank::world]
    counts = knn_classify(bank, bank_labels, queries[mine.to(queries.device)], labels[mine.to(labels.device)],
                          train.num_classes, settings.ks, settings.temperature, settings.chunk)
    flat = torch.tensor([c for k in settings.ks for c in counts[k]], dtype=torch.long, device=queries.device)
    if distributed.is_distributed():
        flat = distributed.all_reduce(flat, "sum")
    total = queries.shape[0]
    metrics = {}
    for position, k in enumerate(settings.ks):
        metrics[f"top1@k{k}"] = float(flat[2 * position]) / total
        metrics[f"top5@k{k}"] = float(flat[2 * position + 1]) / total
    return metrics, classification_floors(bank_labels, labels, train.num_classes)


def classification_floors(train_labels: Tensor, val_labels: Tensor, num_classes: int) -> dict[str, float]:
    """Chance top-1/top-5 and the accuracy of always answering the most frequent training class."""
    majority = int(torch.bincount(train_labels.long(), minlength=num_classes).argmax())
    return {"chance_top1": 1.0 / num_classes, "chance_top5": min(5, num_classes) / num_classes,
            "majority_top1": float((val_labels.long() == majority).float().mean())}
