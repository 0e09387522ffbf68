"""The probes' torchmetrics: top-k accuracy and mIoU, summed over processes when ``compute`` is called.

Each process updates with its own shard; torchmetrics gathers the counts (integers, so the result is exact
and equal to a single-process run) when ``compute`` runs on every process.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

__all__ = ["IGNORE_INDEX", "top_k_accuracies", "mean_iou", "update_all", "compute_all"]

IGNORE_INDEX = 255


def top_k_accuracies(num_classes: int, device: torch.device, top_k: tuple[int, ...] = (1, 5)) -> dict[str, Metric]:
    """``{"top1": ..., "top5": ...}`` micro accuracies (k capped at the number of classes)."""
    return {f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro").to(device)
            for k in top_k}


def mean_iou(num_classes: int, device: torch.device) -> Metric:
    """Mean IoU over the classes present in the targets or the predictions, pixels labelled 255 ignored."""
    return MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX).to(device)


def update_all(metrics: Mapping[str, Metric], predictions: Tensor, targets: Tensor) -> None:
    """Update every metric with the same predictions (scores or labels) and targets (skips empty batches)."""
    if targets.numel() == 0:
        return
    for metric in metrics.values():
        metric.update(predictions, targets)


def compute_all(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """``compute`` every metric (all processes must call this together) as Python floats."""
    return {name: float(metric.compute()) for name, metric in metrics.items()}
